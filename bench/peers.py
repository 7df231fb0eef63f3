"""emo-edge against llama.cpp on the same model, side by side: prefill and decode tokens/s, peak RSS, bits per
weight and the memory-bandwidth roofline, in fresh processes alternating A B A B.

Setup (once; llama.cpp is a benchmark-only dependency in its own venv, see bench/gguf_emo.py):

    emo-edge synth /tmp/peers/ckpt --preset emo-14b --layers 16 --experts 33      # 32 routed + 1 shared, 8 GB
    python -c "import json; json.dump({'layers': [list(range(32))] * 16}, open('/tmp/peers/pool_all32.json', 'w'))"
    emo-edge export --model /tmp/peers/ckpt --pools /tmp/peers/pool_all32.json --optimize speed \
        --out /tmp/peers/bundle --no-verify      # int4 block 128, int8 KV, shared expert in the QMoE
    /tmp/llama/venv/bin/python bench/gguf_emo.py write /tmp/peers/ckpt /tmp/peers/emo-bf16.gguf
    /tmp/llama/venv/bin/python bench/gguf_emo.py quantize /tmp/peers/emo-bf16.gguf /tmp/peers/emo-q4_0.gguf
    python bench/peers_check.py --model /tmp/peers/ckpt --bundle /tmp/peers/bundle \
        --gguf /tmp/peers/emo-q4_0.gguf,/tmp/peers/emo-bf16.gguf      # the GGUF is the same model

Run (nice, on an otherwise idle machine; 1-2 minutes per run, 4 runs per pair):

    nice -n 10 python bench/peers.py --bundle /tmp/peers/bundle --gguf /tmp/peers/emo-q4_0.gguf \
        --model /tmp/peers/ckpt [--pairs 5] [--prompts 128,1024] [--tokens 64] [--threads 2] [--json out.json]

Each run is a fresh worker process (bench/peer_workers.py): `emo` (this Python, the bundle through
`open_engine`, as `emo-edge run`) or `llama` (the llama venv's Python, llama-cpp-python's C API with
llama.cpp's context defaults: n_batch 2048, n_ubatch 512, f16 KV, flash attention auto; n_ctx = the bundle's
context). A worker loads the model, warms up on one token, then prefills the prompt (the same random ids from
the tokenizer's range for both sides) and greedily decodes `--tokens` tokens, each the argmax of the last
logits it read back. It reports prefill tok/s, decode tok/s ((tokens - 1) / decode time: the first token comes
from the prefill), peak RSS (VmHWM; RssAnon and RssFile at exit: llama.cpp's mapped GGUF pages are file RSS),
the ids, and CPU contention while decoding: `rq wait`, seconds its threads sat runnable without a CPU
(/proc/self/task/*/schedstat) per decode second. On a shared box that matters: llama.cpp's threads meet at a
spinning barrier after every graph node, so one descheduled thread stalls the other. Ratios are taken pair by
pair, the median printed. Read bandwidth: a numpy sum over 1 GiB on `--threads` threads, before and after
(best kept); a side's roofline = bandwidth / bytes it reads per decoded token (non-expert weights, the active
experts' share, one embedding row, the KV cache at the mean decode context), from the bundle's plan and the
GGUF's tensor table.

No PyTorch side: the fp32 reference at 16 layers x 33 experts holds 16 GB of weights on a shared 24 GB box.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from peer_workers import LLAMA_PYTHON, run_worker, token_range  # noqa: E402,F401  (the worker processes)


# ---- what each side must read per decoded token -------------------------------------------------------------
def emo_weights(bundle: Path, spec, ctx: int) -> dict:
    """Bundle file bytes and bytes read per decoded token, from the plan stored in report.json."""
    from decode import bytes_per_token  # bench/decode.py: the same accounting its table uses

    from emo_edge.errors import BundleError
    from emo_edge.schema import load_json
    from targets import KV_BYTES, get_target

    plan = load_json(bundle / "report.json", BundleError, "not found (the export's report)")["plan"]["plan"]
    kept = [len(e) + len(i) for e, i in zip(plan["experts"], plan["implicit"]) if e is not None]
    active = [layer.top_k for layer in spec.moe_layers]
    kvb = KV_BYTES[plan.get("kv_cache_dtype", get_target(plan["target"]).kv_cache_dtype)]  # the bundle's own cache
    files = sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith("model.onnx"))
    return {"file_bytes": files, "bytes_per_token": bytes_per_token(spec, plan["bytes"], kept, active, ctx, kvb),
            "kv_bytes": kvb}


def llama_weights(gguf: Path, spec, ctx: int, llama_python: str) -> dict:
    """GGUF file bytes and bytes read per decoded token, from its tensor table (gguf_emo.py info); KV f16."""
    proc = subprocess.run([llama_python, str(BENCH / "gguf_emo.py"), "info", str(gguf)], capture_output=True,
                          text=True, cwd="/")
    if proc.returncode != 0:
        raise SystemExit(f"error: {gguf}: {(proc.stderr.strip().splitlines() or ['gguf_emo.py info failed'])[-1]}")
    info = json.loads(proc.stdout)
    share = info["experts_used"] / info["experts"]
    bpt = 0.0
    for name, t in info["tensors"].items():
        if name == "token_embd.weight":
            bpt += t["bytes"] / spec.vocab_size  # one row
        elif "_exps." in name:
            bpt += t["bytes"] * share  # the routed experts a token selects
        else:
            bpt += t["bytes"]
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * ctx * 2  # f16 K and V
    types = sorted({t["type"] for t in info["tensors"].values()})
    return {"file_bytes": info["file_bytes"], "bytes_per_token": int(bpt + kv), "kv_bytes": 2, "types": types,
            "output_type": info["tensors"]["output.weight"]["type"],
            "embd_type": info["tensors"]["token_embd.weight"]["type"]}


def checkpoint_params(ckpt: Path) -> int:
    """The checkpoint's parameter count (elements of every tensor in its safetensors headers)."""
    from gguf_emo import Checkpoint

    ck = Checkpoint(ckpt)
    return sum(int(np.prod(st.entries[n]["shape"], dtype=np.int64)) for n, st in ck.where.items())


# ---- the side-by-side run -----------------------------------------------------------------------------------
def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    return "/".join(fmt.format(v) for v in (min(xs), statistics.median(xs), max(xs)))


def bench(args) -> dict:
    from decode import read_bandwidth  # bench/decode.py's probe

    from emo_edge.bundle.schema import read_model_dims
    from emo_edge.model.spec import load_spec
    from emo_edge.units import fmt_bytes

    spec = load_spec(args.model)
    n_ctx = read_model_dims(args.bundle, {}, need_filename=True)["context_length"]
    prompts = [int(p) for p in args.prompts.split(",")]
    load_before = os.getloadavg()
    bw_before = read_bandwidth(threads=args.threads)
    rng = np.random.default_rng(args.seed)
    ids = {p: [int(x) for x in rng.integers(*token_range(args.model), size=p)] for p in prompts}
    runs: dict[tuple[str, int], list[dict]] = {(s, p): [] for s in ("emo", "llama") for p in prompts}
    run_lines: list[str] = []
    for pair in range(args.pairs):
        for p in prompts:
            for side in (("emo", "llama") if pair % 2 == 0 else ("llama", "emo")):
                job = {"ids": ids[p], "tokens": args.tokens, "threads": args.threads, "bundle": str(args.bundle),
                       "gguf": str(args.gguf), "n_ctx": n_ctx, "llama_mmap": not args.llama_no_mmap}
                r = run_worker(side, job, args.llama_python)
                if "error" in r:
                    raise SystemExit(f"error: {side} worker (prompt {p}): {r['error']}")
                r["load_1min"] = os.getloadavg()[0]
                runs[(side, p)].append(r)
                line = (f"  pair {pair + 1}/{args.pairs} prompt {p:>5} {side:<6} prefill "
                        f"{r['prefill_tok_s']:7.1f} tok/s  decode {r['decode_tok_s']:6.2f} tok/s  peak RSS "
                        f"{fmt_bytes(r['peak_rss'])}  rq wait {r['decode_wait']:.2f}  cpu {r['decode_cpu']:.2f}  "
                        f"nivcsw {r['decode_nivcsw']}  "
                        f"load {r['load_1min']:.2f}")
                run_lines.append(line)
                print(line, file=sys.stderr, flush=True)
    bw = max(bw_before, read_bandwidth(threads=args.threads))
    load_after = os.getloadavg()
    params = checkpoint_params(args.model)
    rows = [f"emo-edge vs llama.cpp  model {args.model}: {spec.num_layers} layers, hidden {spec.hidden_size}, "
            f"{spec.layers[0].num_experts - 1}+1 experts, top-{spec.top_k}, {params / 1e9:.2f}B params  "
            f"threads {args.threads}  decode {args.tokens} tokens  {args.pairs} pair(s) (A B, B A, ...)",
            f"load average {' '.join(f'{x:.2f}' for x in load_before)} before, "
            f"{' '.join(f'{x:.2f}' for x in load_after)} after, on {os.cpu_count()} cpus;  read bandwidth "
            f"{bw / 1e9:.2f} GB/s (numpy sum of 1 GiB on {args.threads} threads, best before/after)",
            f"{'side':<7}{'prompt':>7}{'prefill tok/s':>22}{'decode tok/s':>20}{'peak RSS':>11}{'bits/w':>8}"
            f"{'bytes/tok':>11}{'roofline':>10}{'share':>7}{'rq wait':>9}",
            f"{'':<7}{'':>7}{'min/median/max':>22}{'min/median/max':>20}{'(max)':>11}{'':>8}{'':>11}"
            f"{'tok/s':>10}{'':>7}{'median':>9}"]
    summary: dict = {"bandwidth_bytes_s": bw, "load_before": load_before, "load_after": load_after,
                     "params": params, "n_ctx": n_ctx, "prompts": {}, "prompt_ids": ids}
    for p in prompts:
        ctx = p + args.tokens // 2  # mean context while decoding
        weights = {"emo": emo_weights(Path(args.bundle), spec, ctx),
                   "llama": llama_weights(Path(args.gguf), spec, ctx, args.llama_python)}
        summary["prompts"][p] = {}
        for side in ("emo", "llama"):
            rs, w = runs[(side, p)], weights[side]
            dec = [r["decode_tok_s"] for r in rs]
            roof = bw / w["bytes_per_token"]
            summary["prompts"][p][side] = dict(w, decode_median=statistics.median(dec),
                                               prefill_median=statistics.median(r["prefill_tok_s"] for r in rs),
                                               peak_rss=max(r["peak_rss"] for r in rs), roofline_tok_s=roof)
            rows.append(f"{side:<7}{p:>7}{spread([r['prefill_tok_s'] for r in rs]):>22}"
                        f"{spread(dec, '{:.2f}'):>20}{fmt_bytes(max(r['peak_rss'] for r in rs)):>11}"
                        f"{8 * w['file_bytes'] / params:>8.2f}{fmt_bytes(w['bytes_per_token']):>11}{roof:>10.1f}"
                        f"{100 * statistics.median(dec) / roof:>6.0f}%"
                        f"{statistics.median(r['decode_wait'] for r in rs):>9.2f}")
    for p in prompts:
        ratio = {k: statistics.median(e[k] / l[k] for e, l in zip(runs[("emo", p)], runs[("llama", p)]))
                 for k in ("prefill_tok_s", "decode_tok_s", "peak_rss")}
        summary["prompts"][p]["ratio"] = ratio
        rows.append(f"emo/llama at prompt {p} (median of {args.pairs} pair ratios): prefill "
                    f"{ratio['prefill_tok_s']:.2f}x  decode {ratio['decode_tok_s']:.2f}x  peak RSS "
                    f"{ratio['peak_rss']:.2f}x")
    if len(prompts) > 1:
        lo, hi = min(prompts), max(prompts)
        rel = {s: summary["prompts"][hi][s]["decode_median"] / summary["prompts"][lo][s]["decode_median"]
               for s in ("emo", "llama")}
        summary["decode_long_vs_short"] = rel
        rows.append(f"decode at prompt {hi} / at prompt {lo} (medians): emo {rel['emo']:.2f}x  "
                    f"llama {rel['llama']:.2f}x")
    rows += token_lines(runs, prompts)
    for side in ("emo", "llama"):
        last = runs[(side, prompts[-1])][-1]
        rows.append(f"{side} RSS at exit (prompt {prompts[-1]}, last run): anon {fmt_bytes(last.get('rssanon', 0))}, "
                    f"file-backed {fmt_bytes(last.get('rssfile', 0))}")
    rows.append("rq wait = seconds its threads sat runnable waiting for a CPU per second of decode "
                "(/proc/self/task/*/schedstat); per run:")
    rows += run_lines
    lw = summary["prompts"][prompts[0]]["llama"]
    info = runs[("llama", prompts[0])][0]
    rows.append(f"llama.cpp (llama-cpp-python {info['version']}): bailingmoe GGUF, embedding {lw['embd_type']}, "
                f"output {lw['output_type']}, router F32; context {info['params']} (flash_attn -1 = auto, "
                f"type 1 = f16); CPU features {info['system_info']}")
    plan = json.loads((Path(args.bundle) / "report.json").read_text())["plan"]["plan"]
    lay = {k: f" (block {v['block_size']}, {v['scale_dtype']} scales)" for k, v in plan["layouts"].items()}
    prec = ", ".join(f"{k} {v}{lay.get(k, '')}" for k, v in plan["precision"].items())
    rows.append(f"emo-edge: {args.bundle}: {prec}; KV {plan['kv_cache_dtype']}; bits/w = file bytes x 8 / params")
    print("\n".join(rows))
    report = {"summary": summary, "runs": {f"{s}@{p}": rs for (s, p), rs in runs.items()}, "table": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def token_lines(runs: dict, prompts: list[int]) -> list[str]:
    """Greedy tokens are real (argmax of the logits each side read back): distinct ids, the first few, and
    whether every run of a side produced the same ids (determinism)."""
    out = []
    for p in prompts:
        parts = []
        for side in ("emo", "llama"):
            toks = [r["tokens"] for r in runs[(side, p)]]
            same = all(t == toks[0] for t in toks)
            parts.append(f"{side} {len(set(toks[0]))} distinct of {len(toks[0])}, first {toks[0][:6]}"
                         f"{'' if same else ' (runs differ!)'}")
        e, l = runs[("emo", p)][0]["tokens"], runs[("llama", p)][0]["tokens"]
        first = next((i for i, (a, b) in enumerate(zip(e, l)) if a != b), len(e))
        same = sum(a == b for a, b in zip(e, l))
        out.append(f"greedy tokens at prompt {p}: " + "; ".join(parts) + f"; sides agree on the first {first} "
                   f"and at {same}/{len(e)} positions")
    return out


# ---- command line -------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="emo-edge int4 bundle of the checkpoint")
    p.add_argument("--gguf", type=Path, required=True, help="GGUF of the same checkpoint (bench/gguf_emo.py)")
    p.add_argument("--model", type=Path, required=True, help="the source checkpoint (shape, params, reference)")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--prompts", default="128,1024")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-no-mmap", action="store_true",
                   help="llama.cpp reads the GGUF into memory (--no-mmap) instead of mapping it")
    p.add_argument("--llama-python", default=LLAMA_PYTHON, help="python of the llama-cpp-python venv")
    p.add_argument("--json")
    args = p.parse_args(argv)
    for what, path in (("--bundle", args.bundle / "model.onnx"), ("--model", args.model / "config.json"),
                       ("--gguf", args.gguf), ("--llama-python", Path(args.llama_python))):
        if not path.is_file():
            p.exit(2, f"error: {what} {path}: not found\n")
    try:
        prompts = [int(x) for x in args.prompts.split(",")]
    except ValueError:
        p.exit(2, f"error: --prompts {args.prompts!r}: expected comma-separated integers\n")
    if args.pairs < 1 or args.tokens < 2 or min(prompts) < 1 or args.threads < 1:
        p.exit(2, "error: --pairs and --threads must be >= 1, --tokens >= 2, prompts >= 1\n")
    if args.json and Path(args.json).exists():
        p.exit(2, f"error: --json {args.json}: exists; refusing to overwrite it\n")
    sys.path[:0] = [str(ROOT), str(BENCH)]
    from emo_edge.errors import EmoEdgeError

    try:
        bench(args)
    except EmoEdgeError as exc:
        p.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
