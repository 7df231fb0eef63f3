"""Which int4 layout and KV cache dtype should the cpu target use?  (issue 12, items 1 and 3)

    nice -n 10 python bench/quant_layout.py kv       [--rounds 4]      # KV cache float32 vs float16: decode speed
    nice -n 10 python bench/quant_layout.py layouts  [--rounds 2] [--planted DIR] [--speed/--no-speed]
    nice -n 10 python bench/quant_layout.py calibrate [--precisions int4 int8 fp32]  # the planner's speed model
    nice -n 10 python bench/quant_layout.py compare BUNDLE... [--prompts 128 512]   # auto vs the fastest plan

`kv`: a real-width 4-layer decoder (hidden 2048, 16 heads x 128 = 16 KV heads, experts 8 routed + 1 shared of
intermediate 1024, top-8, int4, a quarter vocabulary so the lm_head's share of a token's bytes is the 16-layer
model's) built by the exporter (exporters/onnx.py DecoderBuilder) from random weights, once with a float32 and once
with a float16 and once with an int8 KV cache (static per-channel scales). Decode ms/token after a prompt of 128 and 1024 tokens, two ways of feeding the cache:
"copy" (past in, a new present out: the bundle loader of today) and "shared" (past and present bound to one
preallocated buffer of the context's capacity with IOBinding: what a preallocating engine does). A B A B rounds,
medians. `kv --mixed` adds the graph variant without Casts (fp32 q/k/v, fp16 cache, accepted by the 1.32 CPU
kernel) to show why the exporter casts.

`layouts`: each int4 layout (block 32/64/128 x float32/float16 scales x symmetric/asymmetric; float16 scales only
where the operator takes them: QMoE experts and the GatherBlockQuantized embedding, the MatMulNBits parts keep
float32 scales at the same block): bits per weight of an expert at real width (counted from the packed arrays, and
checked against the planner's arithmetic), KL / top-1 (decisive tokens) / perplexity ratio against the fp32
reference on the embedded emo-tiny (math,code) and on a planted synthetic (`synth --preset small --plant`, all
experts), each bundle exported by the real pipeline with the layout and run with onnxruntime directly (typed KV
cache), and decode tok/s + resident MB of the real-width graph above. emo-tiny's experts (intermediate 80) always
use block 16 (QMoE needs whole blocks); only its attention/head/embedding layouts change.

`calibrate`: bytes per token (the planner's arithmetic) and measured decode tok/s of the real-width stand-in at each
precision, the numpy read bandwidth probe of bench/decode.py before and after, and the effective bandwidth the
planner's speed model should use (targets/<t>.json "speed").

`compare`: exported bundles (e.g. `export --optimize balanced` and `--optimize speed` of one model and budget)
decoded side by side, each with its plan's estimate and its share of the fastest one's measured tok/s.

Each measurement runs in its own subprocess (`_worker`), so sessions, arenas and RSS do not leak between them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from quant_graphs import (  # noqa: E402  (bench/quant_graphs.py, beside this script)
    LAYERS, VOCAB, Decoder, build_speed_graph, rss, speed_spec,
)

TINY = ROOT / "emo_edge" / "models" / "emo-tiny"
H, I = 2048, 1024
LAYOUTS = [(b, s, sym) for b in (32, 64, 128) for s in ("float32", "float16") for sym in (True, False)]


def layout_name(block: int, scale: str, sym: bool) -> str:
    return f"b{block} {'fp16' if scale == 'float16' else 'fp32'}-scales {'sym' if sym else 'asym'}"


def layouts_for(block: int, scale: str, sym: bool) -> dict:
    """Per component: float16 scales only where the operator takes them with fp32 activations."""
    from targets import FP16_SCALE_COMPONENTS, COMPONENTS
    return {c: {"block_size": block, "symmetric": sym,
                "scale_dtype": scale if c in FP16_SCALE_COMPONENTS else "float32"} for c in COMPONENTS}


def target_with(block: int, scale: str, sym: bool, kv: str):
    from targets import Layout, get_target
    lay = layouts_for(block, scale, sym)
    return dataclasses.replace(get_target("cpu"), kv_cache_dtype=kv, kv_cache_dtypes=(kv,), block_size=block,
                               symmetric=sym,
                               scale_dtype="float32", layouts={c: Layout(**v) for c, v in lay.items()})


# ---- workers ----------------------------------------------------------------------------------------------
def worker(args) -> dict:
    if args.what == "speed":
        base = rss()
        d = Decoder(Path(args.graph) / "model.onnx", args.threads)
        loaded = rss()
        per = {}
        for prompt in args.prompts:
            f = d.decode_shared if args.mode == "shared" else d.decode_copy
            times = f(prompt, args.tokens, 4096) if args.mode == "shared" else f(prompt, args.tokens, VOCAB)
            per[str(prompt)] = statistics.median(times)
        return {"s_per_token": per, "resident": loaded - base, "rss_after": rss() - base}
    if args.what == "accuracy":
        return accuracy(Path(args.model), args.pools, json.loads(args.layout), args.kv)
    raise SystemExit(f"unknown worker {args.what}")


def accuracy(model: Path, pools: str, layout: list, kv: str) -> dict:
    """Export `model` at int4 with the layout (no verification), run it with `Decoder`, compare with the fp32
    reference on the verification's own sample (export/verify.py)."""
    from emo_edge.model.checkpoint import CheckpointView
    from emo_edge.export import verify
    from emo_edge.export.pipeline import export
    from emo_edge.model.reference import Reference
    from emo_edge.model.tokenizer import TextTokenizer
    from targets import get_target

    tgt = target_with(*layout, kv)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        out = Path(tmp) / "b"
        rep = export(model, pools, None, 256, tgt, "int4", out, False, False, progress=False)
        view = CheckpointView(model)
        layers = [None if e is None else list(e) for e in rep["plan"]["plan"]["experts"]]
        ref = Reference(view, pool=layers)
        tok = TextTokenizer(out / "tokenizer.json")
        s = verify.FULL_SAMPLE
        seqs = verify.heldout_sequences(tok.encode, view.spec.vocab_size, s["sequences"], s["length"])
        refs = verify.reference_logits(ref, seqs)
        stats = verify._compare(Decoder(out / "model.onnx"), seqs, refs)
        th = get_target("cpu").thresholds("int4")
        stats["passes_int4"] = bool((stats["top1_decisive"] is None or stats["top1_decisive"] >= th["top1_agreement"])
                                    and stats["kl_mean"] <= th["kl"] and stats["ppl_ratio"] <= th["ppl_ratio"])
        stats["layouts"] = rep["plan"]["plan"]["layouts"]
        stats["bundle_bytes"] = sum(rep["sizes"].values())
        return stats


def run_worker(*argv: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "_worker", *argv], capture_output=True, text=True)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def load() -> str:
    return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cpus"


def expert_bpw(block: int, scale: str, sym: bool) -> tuple[float, float]:
    """(bits per weight counted from the packed arrays of one real-width expert, the planner's arithmetic)."""
    from emo_edge.plan.sizing import expert_bytes
    from emo_edge.quant import QuantScheme, quantize_blockwise
    from emo_edge.model.spec import spec_from_config
    from emo_edge.model.synth import PRESETS, build_config
    s = QuantScheme(4, block, sym, scale)
    w = np.random.default_rng(0).standard_normal((2 * I, H), dtype=np.float32)
    counted = quantize_blockwise(w, s).nbytes + quantize_blockwise(w[:H, :I], s).nbytes
    spec = spec_from_config(build_config(PRESETS["emo-14b"], layers=1))
    planned = expert_bytes(spec, "int4", {"block_size": block, "symmetric": sym, "scale_dtype": scale})
    return counted * 8 / (3 * H * I), planned * 8 / (3 * H * I)


# ---- the commands -----------------------------------------------------------------------------------------
def speed_rounds(graphs: dict[str, Path], rounds: int, mode: str, prompts: list[int], tokens: int,
                 threads: int) -> dict[str, list[dict]]:
    """A B A B ...: each round runs every graph once (order reversed on odd rounds), one subprocess each."""
    runs: dict[str, list[dict]] = {k: [] for k in graphs}
    names = list(graphs)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            runs[name].append(run_worker("--what", "speed", "--graph", str(graphs[name]), "--mode", mode,
                                         "--prompts", *map(str, prompts), "--tokens", str(tokens),
                                         "--threads", str(threads)))
    return runs


def med(runs: list[dict], prompt: int) -> float:
    ok = [r["s_per_token"][str(prompt)] for r in runs if "error" not in r]
    return statistics.median(ok) if ok else float("nan")


def cmd_kv(a) -> None:
    lay = layouts_for(a.block, "float32", True)
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        graphs = {kv: Path(tmp) / kv for kv in ("float32", "float16", "int8")}
        for kv, d in graphs.items():
            build_speed_graph(d, lay, kv)
        if a.mixed:
            from exporters import onnx as ex
            graphs["float16 no-cast"] = Path(tmp) / "mixed"
            orig = ex.DecoderBuilder.attention
            ex.DecoderBuilder.attention = _attention_without_casts(orig)
            build_speed_graph(graphs["float16 no-cast"], lay, "float16")
            ex.DecoderBuilder.attention = orig
        print(f"KV cache dtype: decode ms/token, real-width {LAYERS}-layer int4 decoder (b{a.block} fp32-scales sym), "
              f"{a.threads} threads, {a.rounds} rounds A B A B, medians; {load()}")
        print(f"{'mode':<8}{'prompt':>7}" + "".join(f"{k:>18}" for k in graphs) + f"{'fp16/fp32':>11}"
              f"{'int8/fp32':>11}")
        result = {}
        for mode in ("copy", "shared"):
            runs = speed_rounds(graphs, a.rounds, mode, [128, 1024], a.tokens, a.threads)
            for prompt in (128, 1024):
                ms = {k: 1e3 * med(v, prompt) for k, v in runs.items()}
                result[f"{mode}/{prompt}"] = ms
                print(f"{mode:<8}{prompt:>7}" + "".join(f"{ms[k]:>18.2f}" for k in graphs)
                      + f"{ms['float16'] / ms['float32']:>11.3f}{ms['int8'] / ms['float32']:>11.3f}")
        print(load())
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


def _attention_without_casts(orig):
    """The exporter's attention with the fp16 Casts taken out again (q/k/v fp32 into an fp16 cache)."""
    from onnx import TensorProto

    def attention(self, i, x, lw):
        real = self.g.one

        def one(op, inputs, name, domain="", **attrs):
            if op == "Cast" and attrs.get("to") == TensorProto.FLOAT16 and "/attn/" in name:
                return inputs[0]
            if op == "Cast" and name.endswith("GroupQueryAttention/Cast_fp32"):
                return inputs[0]
            return real(op, inputs, name, domain, **attrs)
        if not getattr(self, "_rope32", False):  # GQA's T binds q and cos/sin: the caches back to fp32
            self.cos = real("Cast", [self.cos], "/bench/cos_fp32", to=TensorProto.FLOAT)
            self.sin = real("Cast", [self.sin], "/bench/sin_fp32", to=TensorProto.FLOAT)
            self._rope32 = True
        self.g.one = one
        try:
            return orig(self, i, x, lw)
        finally:
            self.g.one = real
    return attention


def cmd_layouts(a) -> None:
    rows = {layout_name(*lay): lay for lay in LAYOUTS}
    acc: dict[str, dict] = {}
    models = [("emo-tiny", TINY, "math,code")] + ([("planted", Path(a.planted), "all")] if a.planted else [])
    models = models if a.accuracy else []
    for name, lay in rows.items():
        for mname, path, pools in models:
            acc[f"{name}|{mname}"] = run_worker("--what", "accuracy", "--model", str(path), "--pools", pools,
                                                "--layout", json.dumps(list(lay)), "--kv", a.kv)
    speed = {}
    if a.speed:
        with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
            graphs = {}
            for name, lay in rows.items():
                graphs[name] = Path(tmp) / name.replace(" ", "_")
                build_speed_graph(graphs[name], layouts_for(*lay), a.kv)
            runs = speed_rounds(graphs, a.rounds, "shared", [128], a.tokens, a.threads)
            for name, rs in runs.items():
                ok = [r for r in rs if "error" not in r]
                speed[name] = {"tok_s": 1.0 / med(rs, 128), "resident": max((r["resident"] for r in ok), default=0),
                               "file": (graphs[name] / "model.onnx.data").stat().st_size}
    print(f"int4 layouts (KV cache {a.kv}); accuracy vs the fp32 reference on the verification sample (8 x 64 "
          f"held-out tokens; top-1 on decisive tokens); decode at real width ({LAYERS} layers, prompt 128, shared "
          f"KV, {a.threads} threads, {a.rounds} rounds, medians); {load()}")
    head = f"{'layout':<24}{'bpw':>6}{'plan':>6}"
    for m, _, _ in models:
        head += f"{m + ' KL':>14}{'top1':>7}{'ppl':>7}"
    head += f"{'tok/s':>8}{'res/file':>9}" if a.speed else ""
    print(head)
    for name, lay in rows.items():
        counted, planned = expert_bpw(*lay)
        line = f"{name:<24}{counted:>6.3f}{planned:>6.3f}"
        for m, _, _ in models:
            r = acc[f"{name}|{m}"]
            if "error" in r:
                line += f"{'error':>28}"
                continue
            top1 = "-" if r["top1_decisive"] is None else f"{r['top1_decisive']:.3f}"
            line += f"{r['kl_mean']:>13.4f}{'' if r['passes_int4'] else '!'}{top1:>7}{r['ppl_ratio']:>7.3f}"
        if a.speed:
            sp = speed[name]
            line += f"{sp['tok_s']:>8.2f}{sp['resident'] / sp['file']:>9.3f}"
        print(line)
    print("('!' after a KL: the int4 verification thresholds of targets/cpu.json fail for that model); " + load())
    if a.json:
        Path(a.json).write_text(json.dumps({"accuracy": acc, "speed": speed}, indent=2) + "\n")
    for k, r in acc.items():
        if "error" in r:
            print(f"error {k}: {r['error']}")


def cmd_calibrate(a) -> None:
    """Effective bandwidth and per-layer cost for targets/<t>.json "speed" (see emo_edge/plan/sizing.py)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from decode import read_bandwidth

    from emo_edge.plan.search import make_plan
    from targets import get_target

    spec, tgt = speed_spec(), get_target(a.target)
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        graphs, per_token = {}, {}
        for prec in a.precisions:
            plan = make_plan(spec, None, None, 4096, tgt, prec)
            graphs[prec] = Path(tmp) / prec
            build_speed_graph(graphs[prec], plan.layouts, plan.kv_cache_dtype, precision=prec)
            per_token[prec] = plan.speed["bytes_per_token"]  # at speed.context_tokens of context
        probe = read_bandwidth(threads=a.threads)
        runs = speed_rounds(graphs, a.rounds, a.mode, [tgt.speed.context_tokens], a.tokens, a.threads)
        probe2 = read_bandwidth(threads=a.threads)
    print(f"speed calibration: real-width {LAYERS}-layer stand-ins, prompt {tgt.speed.context_tokens}, KV {a.mode}, "
          f"{a.threads} threads, {a.rounds} rounds A B A B, medians; numpy read probe {probe / 1e9:.2f} GB/s before, "
          f"{probe2 / 1e9:.2f} GB/s after; {load()}")
    print(f"{'precision':<10}{'bytes/token':>13}{'ms/token':>10}{'tok/s':>8}{'effective GB/s':>16}{'planner est':>13}")
    for prec in a.precisions:
        sec = med(runs[prec], tgt.speed.context_tokens)
        est = make_plan(spec, None, None, 4096, tgt, prec).speed["tok_s"]
        print(f"{prec:<10}{per_token[prec] / 1e6:>11.1f}MB{1e3 * sec:>10.2f}{1 / sec:>8.2f}"
              f"{per_token[prec] / sec / 1e9:>16.2f}{est:>13.2f}")
    print(load())


def cmd_compare(a) -> None:
    """Measured decode of exported bundles side by side (A B A B), against their plans' estimates: is the
    default (balanced) plan within 10% of the fastest plan with the same experts?"""
    graphs = {Path(b).name: Path(b) for b in a.bundles}
    runs = {m: speed_rounds(graphs, a.rounds, m, a.prompts, a.tokens, a.threads) for m in ("copy", "shared")}
    print(f"decode of exported bundles, {a.threads} threads, {a.rounds} rounds A B A B, medians; {load()}")
    print(f"{'bundle':<24}{'plan':<34}{'est tok/s':>10}" + "".join(
        f"{m + ' ' + str(pr):>14}" for m in runs for pr in a.prompts))
    best = {(m, pr): max(1 / med(runs[m][n], pr) for n in graphs) for m in runs for pr in a.prompts}
    for name, path in graphs.items():
        plan = json.loads((path / "report.json").read_text())["plan"]["plan"]
        label = "/".join(plan["precision"][c] for c in ("attention", "experts", "embedding", "lm_head"))
        label += f" kv {plan['kv_cache_dtype']} ({plan['optimize']})"
        cells = "".join(f"{1 / med(runs[m][name], pr):>8.2f} {100 * (1 / med(runs[m][name], pr)) / best[(m, pr)]:>3.0f}%"
                        for m in runs for pr in a.prompts)
        print(f"{name:<24}{label:<34}{plan['speed']['tok_s']:>10.2f}{cells}")
    print("(tok/s and % of the fastest bundle in that column) " + load())


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("_worker")
    w.add_argument("--what", required=True)
    w.add_argument("--graph"); w.add_argument("--mode", default="shared")
    w.add_argument("--prompts", type=int, nargs="+", default=[128]); w.add_argument("--tokens", type=int, default=16)
    w.add_argument("--threads", type=int, default=2)
    w.add_argument("--model"); w.add_argument("--pools"); w.add_argument("--layout"); w.add_argument("--kv")
    for name in ("kv", "layouts"):
        c = sub.add_parser(name)
        c.add_argument("--rounds", type=int, default=4 if name == "kv" else 2)
        c.add_argument("--tokens", type=int, default=16)
        c.add_argument("--threads", type=int, default=2)
        c.add_argument("--tmp", default=None)
        c.add_argument("--json")
    sub.choices["kv"].add_argument("--mixed", action="store_true")
    sub.choices["kv"].add_argument("--block", type=int, default=64)
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("bundles", nargs="+")
    cmp_.add_argument("--prompts", type=int, nargs="+", default=[128, 512])
    for k, v in (("--rounds", 3), ("--tokens", 12), ("--threads", 2)):
        cmp_.add_argument(k, type=int, default=v)
    cal = sub.add_parser("calibrate")
    cal.add_argument("--precisions", nargs="+", default=["int4", "int8", "fp32"])
    cal.add_argument("--target", default="cpu")
    cal.add_argument("--mode", default="copy", choices=["copy", "shared"])
    for k, v in (("--rounds", 2), ("--tokens", 12), ("--threads", 2)):
        cal.add_argument(k, type=int, default=v)
    cal.add_argument("--tmp", default=None)
    lay = sub.choices["layouts"]
    lay.add_argument("--planted", help="a `synth --preset small --plant --dtype fp32` checkpoint")
    lay.add_argument("--kv", default="float16")
    lay.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True)
    lay.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args(argv)
    if a.cmd == "_worker":
        print(json.dumps(worker(a)))
    elif a.cmd == "kv":
        cmd_kv(a)
    elif a.cmd == "calibrate":
        cmd_calibrate(a)
    elif a.cmd == "compare":
        cmd_compare(a)
    else:
        cmd_layouts(a)


if __name__ == "__main__":
    main()
