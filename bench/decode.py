"""Decode benchmark: an exported bundle vs the PyTorch reference on the same expert pool, side by side.

    emo-edge synth /tmp/emo14b-l8 --preset emo-14b --layers 8 --experts 33   # real width; 32 routed + 1 shared
    emo-edge export --model /tmp/emo14b-l8 --pools POOL.json --precision int4 --out BUNDLE --no-verify
    nice -n 10 python bench/decode.py --model /tmp/emo14b-l8 --pool POOL.json --bundle BUNDLE \
        [--prompt 64] [--tokens 16] [--repeats 2] [--threads 2] [--sides bundle,reference] [--json out.json]

8 layers is the realistic size here: the fp32 reference of 8 layers x 33 experts peaks at ~8.3 GB (16 layers
would need ~16 GB of a shared 24 GB box). A 33-expert checkpoint is the 32-expert pool slice of emo-14b at the
real width (only the router is narrower than 128), and writes 4.4 GB instead of 13.7 GB.

Each side runs in its own subprocess (`python bench/decode.py _worker ...`) so its peak RSS (ru_maxrss) is its
own: load, prefill `--prompt` tokens, then greedy-decode `--tokens` tokens with the KV cache.
  * reference: `emo_edge.model.reference.Reference(view, pool)` in fp32, resident weights (the lm_head is pinned
    resident too, so the reference is not charged for re-reading the head from disk each token);
  * bundle: emo-edge's engine (`emo_edge.engine.open_engine`, what `emo-edge run` uses): one decode session
    whose KV cache is preallocated and shared between past and present.
Roofline: bytes of weights (+ KV cache) read per decoded token divided by the memory read bandwidth measured in
this script (numpy sum over a buffer far larger than the caches, best of several passes); the table shows
measured decode tokens/s as a fraction of that bound. Bytes per token come from the bundle's plan.json when
present (else from `make_plan` at --precision), and at fp32 for the reference.

For scale: llama.cpp decodes emo-14b's shape (16 layers, 32 experts + 1 shared, top-8, Q4_0, 2 threads) at about
36 tokens/s on this class of machine; the int4 bundle must decode >= 3x faster than the reference.

`python bench/decode.py overhead` measures the planner's runtime-overhead formula (see targets/cpu.json): it
builds int4 stand-in graphs of two sizes (GatherBlockQuantized embedding, MatMulNBits stack, MatMulNBits head,
external data), loads each with `emo_edge.engine.ort_session.cpu_session` (as the engine does) and reports each
subprocess's peak RSS minus the weight file bytes at 1 and N prompt tokens, and the anon/file split after load.
The planner's formula itself is fitted on real bundles with `python bench/residency.py fit` (see targets/cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a
    worker spawned by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_bandwidth(size_bytes: int = 1 << 30, passes: int = 5, threads: int = 2) -> float:
    """Bytes/s of a streaming read: sum of a float32 buffer far bigger than any cache, split over `threads`
    threads (numpy releases the GIL in reductions; one core alone cannot saturate memory), best of `passes`."""
    from concurrent.futures import ThreadPoolExecutor

    buf = np.ones(size_bytes // 4, dtype=np.float32)
    parts = np.array_split(buf, max(1, threads))
    best = float("inf")
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for _ in range(passes):
            t = time.perf_counter()
            list(pool.map(lambda a: a.sum(dtype=np.float32), parts))
            best = min(best, time.perf_counter() - t)
    del buf, parts
    return size_bytes / best


# ---- bytes read per decoded token --------------------------------------------------------------------------
def bytes_per_token(spec, plan_bytes: dict, kept_per_layer: list[int], active_per_layer: list[int],
                    context_len: int, kv_bytes: int) -> int:
    """Weights touched for one decoded token: attention, norms, kept router rows, the active experts' share
    of the expert bytes, one embedding row, the whole lm_head; plus the KV cache read at `context_len`."""
    total_experts = sum(kept_per_layer) or 1
    experts = plan_bytes["experts"] * sum(active_per_layer) / total_experts
    emb_row = plan_bytes["embedding"] / spec.vocab_size
    head = plan_bytes["lm_head"] or plan_bytes["embedding"]  # a tied head reads the shared table
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * context_len * kv_bytes
    return int(plan_bytes["attention"] + plan_bytes.get("dense_mlp", 0) + plan_bytes["router"] + plan_bytes["norms"]
               + experts + emb_row + head + kv)


# ---- workers (run in their own process) --------------------------------------------------------------------
def prompt_ids(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(3, min(vocab, 4096), size=(1, n), dtype=np.int64)  # tokenizer-range ids


def worker_reference(args) -> dict:
    import torch

    from emo_edge.model.checkpoint import CheckpointView
    from emo_edge.model.names import TensorKey
    from emo_edge.pools.file import read_pool_file
    from emo_edge.model.reference import Reference

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    view = CheckpointView(args.model)
    pool = read_pool_file(args.pool, view.spec) if args.pool else None
    ref = Reference(view, pool)
    if ref._head is None:  # pin the head resident (see module docstring)
        ref._head = view.tensor(TensorKey("embed" if view.spec.tie_word_embeddings else "lm_head"))
    ids = prompt_ids(view.spec.vocab_size, args.prompt)
    # load every kept expert up front so timing excludes first-touch reads
    for i, layer in enumerate(view.spec.layers):
        dl = ref.layer(i)
        if layer.num_experts:
            keep = (pool[i] if pool and pool[i] is not None else layer.routed_experts)
            for j in list(keep) + list(layer.implicit_experts):
                dl.expert(j)
    load_s = time.perf_counter() - t0
    cache: list = []
    t = time.perf_counter()
    logits = ref.forward(torch.from_numpy(ids), cache)
    prefill_s = time.perf_counter() - t
    nxt = int(torch.argmax(logits[0, -1]))
    out = [nxt]
    t = time.perf_counter()
    for _ in range(args.tokens - 1):
        logits = ref.forward(torch.tensor([[nxt]]), cache)
        nxt = int(torch.argmax(logits[0, -1]))
        out.append(nxt)
    decode_s = time.perf_counter() - t
    return {"side": "reference", "load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tok_s": args.prompt / prefill_s, "decode_tok_s": (args.tokens - 1) / decode_s,
            "peak_rss": peak_rss(), "tokens": out}


def worker_bundle(args) -> dict:
    """The bundle through emo-edge's engine (what `emo-edge run` uses): one decode session, KV preallocated."""
    from emo_edge.engine import open_engine
    from emo_edge.model.spec import load_spec

    spec = load_spec(args.model)
    t0 = time.perf_counter()
    eng = open_engine(args.bundle, threads=args.threads)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(spec.vocab_size, args.prompt)[0].tolist()
    with eng.serving(None if eng.kind == "static" else args.pool):
        s = eng.session(len(ids) + args.tokens)
        t = time.perf_counter()
        logits = s.prefill(ids)
        prefill_s = time.perf_counter() - t
        nxt = int(np.argmax(logits[-1]))
        out = [nxt]
        t = time.perf_counter()
        for _ in range(args.tokens - 1):
            nxt = int(np.argmax(s.feed([nxt])[-1]))
            out.append(nxt)
        decode_s = time.perf_counter() - t
    return {"side": "bundle", "load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tok_s": args.prompt / prefill_s, "decode_tok_s": (args.tokens - 1) / decode_s,
            "peak_rss": peak_rss(), "tokens": out}


def run_worker(side: str, args, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "_worker", "--side", side, "--prompt", str(args.prompt),
           "--tokens", str(args.tokens), "--threads", str(args.threads)]
    if args.model:
        cmd += ["--model", str(args.model)]
    if args.pool:
        cmd += ["--pool", str(args.pool)]
    if getattr(args, "bundle", None):
        cmd += ["--bundle", str(args.bundle)]
    cmd += list(extra)  # last wins: e.g. the bundle's own pool for the reference
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"side": side, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the side-by-side run ----------------------------------------------------------------------------------
def bench(args) -> dict:
    from emo_edge.plan.search import COMPONENTS, ExportPlan, make_plan, weight_bytes
    from emo_edge.pools.file import read_pool_file
    from emo_edge.model.spec import load_spec
    from emo_edge.units import fmt_bytes
    from targets import get_target

    spec = load_spec(args.model)
    pool = read_pool_file(args.pool, spec) if args.pool else [None] * spec.num_layers
    ctx = args.prompt + args.tokens // 2  # mean context length while decoding
    active = [layer.top_k for layer in spec.moe_layers]
    bw = read_bandwidth(threads=args.threads)
    rows = []
    sides = args.sides.split(",")
    results = {}
    plan_info, ref_pool_args = None, []
    if "bundle" in sides:
        if not args.bundle or not (Path(args.bundle) / "model.onnx").is_file():
            results["bundle"] = {"side": "bundle", "error": f"no model.onnx in bundle {args.bundle!r}"}
            sides = [s for s in sides if s != "bundle"]
        else:
            plan_path = Path(args.bundle) / "plan.json"
            plan = (ExportPlan.from_json(plan_path.read_text()) if plan_path.is_file()
                    else make_plan(spec, pool, None, ctx, args.target, precision=args.precision))
            kept = [len(e) + len(i) for e, i in zip(plan.experts, plan.implicit) if e is not None]
            kvb = get_target(plan.target).kv_bytes_per_element
            plan_info = (bytes_per_token(spec, plan.bytes, kept, active, ctx, kvb),
                         sum(f.stat().st_size for f in Path(args.bundle).rglob("*") if f.is_file()))
            if plan_path.is_file():  # the reference runs on exactly the bundle's experts (trimming included)
                pool = [None if e is None else list(e) for e in plan.experts]
                tmp = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
                tmp.write(json.dumps({"layers": pool}))
                tmp.close()
                ref_pool_args = ["--pool", tmp.name]
    ref_bpt = None
    if "reference" in sides:
        # the reference holds fp32 weights: account them with the planner's arithmetic at fp32
        experts = [None if layer.num_experts == 0 else (list(layer.routed_experts) if pool[layer.index] is None
                   else list(pool[layer.index])) for layer in spec.layers]
        implicit = [list(layer.implicit_experts) for layer in spec.layers]
        ref_bytes, _ = weight_bytes(spec, experts, implicit, dict.fromkeys(COMPONENTS, "fp32"), get_target("cpu"))
        kept = [len(e) + len(i) for e, i in zip(experts, implicit) if e is not None]
        ref_bpt = bytes_per_token(spec, ref_bytes, kept, active, ctx, 4)
    # alternate the sides `--repeats` times and keep each side's best run: the machine is shared, so a
    # background burst should not land on one side only
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for rep in range(args.repeats):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            runs[side].append(run_worker(side, args, ref_pool_args if side == "reference" else []))
    for side, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            results[side] = rs[0]
            continue
        results[side] = dict(max(ok, key=lambda r: r["decode_tok_s"]),
                             prefill_tok_s=max(r["prefill_tok_s"] for r in ok),
                             peak_rss=max(r["peak_rss"] for r in ok))
    if "bundle" in results and plan_info:
        results["bundle"]["bytes_per_token"], results["bundle"]["file_bytes"] = plan_info
    if "reference" in results and ref_bpt:
        results["reference"]["bytes_per_token"] = ref_bpt
    header = (f"{'side':<10}{'prefill tok/s':>14}{'decode tok/s':>13}{'peak RSS':>11}{'bytes/token':>13}"
              f"{'roofline tok/s':>16}{'of roofline':>12}")
    rows.append(f"model {args.model}  layers {spec.num_layers}  prompt {args.prompt}  decode {args.tokens}  "
                f"threads {args.threads}  read bandwidth {bw / 1e9:.2f} GB/s  load avg {os.getloadavg()[0]:.1f} "
                f"on {os.cpu_count()} cpus  best of {args.repeats}")
    rows.append(header)
    for side, r in results.items():
        if "error" in r:
            rows.append(f"{side:<10}error: {r['error']}")
            continue
        bpt = r.get("bytes_per_token")
        roof = bw / bpt if bpt else float("nan")
        r["roofline_tok_s"] = roof
        rows.append(f"{side:<10}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>13.2f}{fmt_bytes(r['peak_rss']):>11}"
                    f"{fmt_bytes(bpt or 0):>13}{roof:>16.1f}{100 * r['decode_tok_s'] / roof:>11.0f}%")
    b, ref = results.get("bundle", {}), results.get("reference", {})
    if "decode_tok_s" in b and "decode_tok_s" in ref:
        speed = b["decode_tok_s"] / ref["decode_tok_s"]
        same = sum(x == y for x, y in zip(b["tokens"], ref["tokens"]))
        rows.append(f"bundle/reference decode speed-up {speed:.2f}x (target >= 3x); greedy tokens agree "
                    f"{same}/{len(ref['tokens'])} (synthetic weights give near-flat logits, so int4 greedy paths "
                    f"diverge early; accuracy is checked by export --verify, not here)")
    print("\n".join(rows))
    report = {"bandwidth_bytes_s": bw, "prompt": args.prompt, "tokens": args.tokens, "threads": args.threads,
              "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---- runtime overhead measurement --------------------------------------------------------------------------
def build_standin(path: Path, vocab: int, hidden: int, n_mats: int, block: int = 32) -> int:
    """An int4 graph shaped like a bundle's weight traffic: GatherBlockQuantized embedding -> n_mats MatMulNBits
    [hidden, hidden] with residual adds -> MatMulNBits head [vocab, hidden] -> logits. Returns weight bytes."""
    import onnx
    from onnx import TensorProto, helper

    from exporters import ort_ops
    from emo_edge.quant import QuantizedTensor, QuantScheme

    rng = np.random.default_rng(0)
    s = QuantScheme(bits=4, block_size=block)

    def rand_qt(n: int, k: int) -> QuantizedTensor:  # distinct random codes: no initializer can be shared
        nb = k // block
        packed = rng.integers(0, 256, size=(n, nb, block // 2), dtype=np.uint8)
        return QuantizedTensor(packed, (rng.random((n, nb), dtype=np.float32) * 0.01), None, (n, k), s)

    nodes, inits = [], []
    table = rand_qt(vocab, hidden)
    emb = {"data": table.packed.reshape(vocab, -1), "scales": table.scales}
    n, i, x = ort_ops.gather_block_quantized("/emb", "input_ids", emb, s)
    nodes += n; inits += i
    for k in range(n_mats):
        n, i, y = ort_ops.matmul_nbits(f"/l{k}", x, rand_qt(hidden, hidden), 4)
        nodes += n; inits += i
        nodes.append(helper.make_node("Add", [x, y], [f"/l{k}/res"]))
        x = f"/l{k}/res"
    n, i, y = ort_ops.matmul_nbits("/head", x, rand_qt(vocab, hidden), 4)
    nodes += n; inits += i
    nodes.append(helper.make_node("Identity", [y], ["logits"]))
    graph = helper.make_graph(nodes, "standin",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "T"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "T", vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return sum(len(t.raw_data) for t in inits)


def rss_split() -> tuple[int, int]:
    """(RssAnon, RssFile) of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out.get("RssAnon", 0), out.get("RssFile", 0)


def worker_standin(args) -> dict:
    import onnxruntime as ort

    from emo_edge.engine.ort_session import cpu_session

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    base = peak_rss()
    sess = cpu_session(args.bundle, so)  # as the engine loads a bundle: external-data pages released after load
    after_load, (anon, file) = peak_rss(), rss_split()
    ids = np.full((1, args.prompt), 7, dtype=np.int64)
    for _ in range(2):
        sess.run(None, {"input_ids": ids})
    return {"base_rss": base, "after_load_rss": after_load, "loaded_anon": anon, "loaded_file": file,
            "peak_rss": peak_rss()}


def overhead(args) -> dict:
    from emo_edge.units import fmt_bytes

    vocab, hidden = 100352, 2048
    out = []
    print(f"int4 stand-ins, vocab {vocab}, hidden {hidden}, threads {args.threads}; load avg "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cpus", flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n_mats in args.sizes:
            d = Path(tmp) / f"m{n_mats}"
            d.mkdir()
            build_standin(d / "model.onnx", vocab, hidden, n_mats)
            file_bytes = sum(f.stat().st_size for f in d.iterdir())
            for t in (1, args.prompt):
                a = argparse.Namespace(prompt=t, tokens=1, threads=args.threads, model=None, pool=None,
                                       bundle=str(d / "model.onnx"))
                r = run_worker("standin", a)
                r.update(n_mats=n_mats, file_bytes=file_bytes, prompt=t,
                         overhead=r["peak_rss"] - file_bytes)
                out.append(r)
                print(f"mats {n_mats:>4} prompt {t:>4}: file {fmt_bytes(file_bytes):>10}  python+ort "
                      f"{fmt_bytes(r['base_rss']):>10}  after load {fmt_bytes(r['after_load_rss']):>10} (resident anon "
                      f"{fmt_bytes(r['loaded_anon'])} / file {fmt_bytes(r['loaded_file'])})  "
                      f"peak {fmt_bytes(r['peak_rss']):>10}  peak - file {fmt_bytes(r['overhead']):>10}", flush=True)
    print(f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return {"runs": out}


# ---- command line ------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_worker":
        p = argparse.ArgumentParser()
        p.add_argument("--side", required=True)
        p.add_argument("--model"); p.add_argument("--pool"); p.add_argument("--bundle")
        p.add_argument("--prompt", type=int, default=128); p.add_argument("--tokens", type=int, default=32)
        p.add_argument("--threads", type=int, default=2)
        a = p.parse_args(argv[1:])
        fn = {"reference": worker_reference, "bundle": worker_bundle, "standin": worker_standin}[a.side]
        print(json.dumps(fn(a)))
        return
    if argv and argv[0] == "overhead":
        p = argparse.ArgumentParser(prog="decode.py overhead")
        p.add_argument("--sizes", type=int, nargs="+", default=[4, 256])
        p.add_argument("--prompt", type=int, default=128)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--tmp", default=None)
        p.add_argument("--json")
        overhead(p.parse_args(argv[1:]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="source checkpoint (e.g. synth --preset emo-14b --layers 8)")
    p.add_argument("--pool", help="pool file {\"layers\": [...]} the bundle was exported with")
    p.add_argument("--bundle", help="bundle directory holding model.onnx (and plan.json)")
    p.add_argument("--sides", default="bundle,reference")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="alternate the sides this many times, keep the best")
    p.add_argument("--target", default="cpu")
    p.add_argument("--precision", default="int4", help="for bytes/token when the bundle has no plan.json")
    p.add_argument("--json")
    bench(p.parse_args(argv))


if __name__ == "__main__":
    main()
