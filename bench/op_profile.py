"""Where a decode step's time goes, operator by operator, against the bytes each operator reads.

    nice -n 10 python bench/op_profile.py --bundle BUNDLE [--prompts 128,1024] [--tokens 24] [--threads 2]
        [--json out.json]

For each prompt length, one fresh process opens the bundle with emo-edge's engine (`StaticEngine`: the
session options, the preallocated KV cache shared between past and present, IOBinding, what `emo-edge run`
uses), re-creates its session with onnxruntime's profiler on, prefills the prompt (random ids), then decodes
`--tokens` greedy steps. Only the decode runs are counted: each profiler `model_run` event after the prefill
is a window, and the kernel events (`*_kernel_time`) inside the windows are summed per group:

    op type (QMoE, MatMulNBits, GroupQueryAttention, ...), and for MatMulNBits the component its node name says:
    attention (q/k/v/o projections), shared expert (implicit.*), lm_head, router

Bytes per decode step of a node (what it must read from memory, from the graph's initializers, no data
loaded): MatMulNBits / QMoE weights as onnxruntime holds them after prepacking (the packed codes + MLAS's
float32 scale and block sum per block, emo_edge/plan/sizing.py); QMoE: k of its E experts; the embedding:
one row; GroupQueryAttention: the KV cache of the mean decode context (2 x kv_heads x positions x head_dim
x the cache's bytes per element). The table prints ms per token, share of the step, MB per token, the
operator's effective GB/s and its share of the machine's read bandwidth (a numpy sum over 1 GiB on
`--threads` threads, best of 3, measured in the same process before the bundle is loaded). "outside Run" is
the step time the profiler does not see (Python, binding, the argmax).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_workers import parse_or_work  # noqa: E402  (the shared worker/argument tail)


def read_probe(threads: int, gib: float = 1.0) -> float:
    """Read bandwidth (bytes/s): numpy sum of a buffer far beyond the caches, split over `threads` threads."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(int(gib * (1 << 30)) // 8, np.float64)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(3):
            t0 = time.perf_counter()
            list(ex.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t0))
    return best


def group(node, op: str) -> str:
    name = node.name
    if op == "MatMulNBits":
        for key, label in (("/attn/", "attention"), ("/implicit.", "shared expert"), ("lm_head", "lm_head"),
                           ("/router", "router")):
            if key in name:
                return f"MatMulNBits ({label})"
    return op


def node_bytes(model, kv_bytes_per_layer: float) -> dict[str, float]:
    """Bytes one decode step reads per node (see the module docstring)."""
    from onnx import helper

    size = {}
    shape = {}
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        length = [int(e.value) for e in t.external_data if e.key == "length"]
        size[t.name] = length[0] if length else len(t.raw_data) or n * 4
        shape[t.name] = list(t.dims)
    out = {}
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = [i for i in node.input if i in size]
        if node.op_type in ("MatMulNBits", "QMoE"):
            bs = int(attrs.get("block_size", 32))
            packed = 0.0
            for i in ins:
                s = shape[i]
                if i.endswith(("weights", ".B")):
                    blocks = int(np.prod(s[:-1])) * (s[-1] * 8 // int(attrs.get("bits", attrs.get(
                        "expert_weight_bits", 4)))) // bs if node.op_type == "QMoE" else int(np.prod(s[:-1]))
                    packed += size[i] + blocks * 8  # codes + MLAS's float32 scale and block sum per block
            if node.op_type == "QMoE":
                packed *= int(attrs["k"]) / shape[node.input[2]][0]
            out[node.name] = packed
        elif node.op_type == "GatherBlockQuantized":
            out[node.name] = sum(size[i] / shape[i][0] for i in ins)  # one row of each
        elif node.op_type == "GroupQueryAttention":
            out[node.name] = kv_bytes_per_layer
        else:
            out[node.name] = float(sum(size[i] for i in ins if node.op_type != "Gather"))
    return out


def worker(job: dict) -> dict:
    import onnx

    sys.path.insert(0, str(ROOT))
    from emo_edge.engine import StaticEngine
    from emo_edge.engine.ort_session import cpu_session, session_options

    bw = read_probe(job["threads"])
    eng = StaticEngine(job["bundle"], threads=job["threads"])
    graph = str(Path(job["bundle"]) / eng.config["decoder"]["filename"])
    prefix = str(Path(job["tmp"]) / f"prof_{job['prompt']}")
    opts = session_options(job["threads"])
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    eng.session_ = None
    eng.session_ = cpu_session(graph, opts)
    rng = np.random.default_rng(0)
    ids = rng.integers(100, min(eng.vocab_size, 50000), job["prompt"]).tolist()
    steps = []
    with eng.serving():
        s = eng.session(job["prompt"] + job["tokens"] + 1)
        logits = s.prefill(ids)
        n_prefill_runs = -(-len(ids) // s.prefill_chunk)
        for _ in range(job["tokens"]):
            t0 = time.perf_counter()
            logits = s.feed([int(np.argmax(logits[-1]))])
            steps.append(time.perf_counter() - t0)
    path = eng.session_.end_profiling()
    events = json.load(open(path))
    os.unlink(path)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode = runs[n_prefill_runs + 1:]  # +1: the engine's warm-up-free first decode step is kept out as well
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in decode]
    model = onnx.load(graph, load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    elem = np.dtype(eng.kv_dtype).itemsize
    mean_ctx = job["prompt"] + job["tokens"] / 2
    kv_layer = 2 * eng.kv_heads * mean_ctx * eng.head_dim * elem
    nbytes = node_bytes(model, kv_layer)
    ms, count = defaultdict(float), defaultdict(set)
    byts = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(a <= e["ts"] < b for a, b in windows):
            continue
        name = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        key = group(nodes[name], op) if name in nodes else op
        ms[key] += e["dur"] / 1e3
        count[key].add(name)
    for name, node in nodes.items():
        byts[group(node, node.op_type)] += nbytes.get(name, 0.0)
    n = len(decode)
    step_ms = statistics.median(steps[1:]) * 1e3
    run_ms = statistics.median(e["dur"] for e in decode) / 1e3
    rows = {k: {"ms": v / n, "nodes": len(count[k]), "bytes": byts.get(k, 0.0)} for k, v in ms.items()}
    return {"prompt": job["prompt"], "bandwidth": bw, "step_ms": step_ms, "run_ms": run_ms, "rows": rows,
            "nodes": len(nodes), "kv_dtype": str(np.dtype(eng.kv_dtype)), "steps": n,
            "load": os.getloadavg()[0]}


def table(r: dict) -> str:
    bw = r["bandwidth"]
    lines = [f"prompt {r['prompt']}: decode step {r['step_ms']:.2f} ms ({1e3 / r['step_ms']:.1f} tok/s; median of "
             f"{r['steps']} steps), inside Run {r['run_ms']:.2f} ms; {r['nodes']} nodes; KV {r['kv_dtype']}; "
             f"read probe {bw / 1e9:.1f} GB/s; load avg {r['load']:.2f}",
             f"{'group':<30}{'nodes':>6}{'ms/tok':>9}{'share':>8}{'MB/tok':>9}{'GB/s':>7}{'of probe':>9}"]
    total_b = 0.0
    for k, v in sorted(r["rows"].items(), key=lambda kv: -kv[1]["ms"]):
        gbs = v["bytes"] / (v["ms"] / 1e3) / 1e9 if v["ms"] and v["bytes"] else 0.0
        total_b += v["bytes"]
        lines.append(f"{k:<30}{v['nodes']:>6}{v['ms']:>9.3f}{v['ms'] / r['step_ms']:>8.1%}{v['bytes'] / 1e6:>9.1f}"
                     f"{gbs:>7.1f}{gbs * 1e9 / bw:>9.0%}")
    outside = r["step_ms"] - sum(v["ms"] for v in r["rows"].values())
    lines.append(f"{'outside kernels (Run + Python)':<30}{'':>6}{outside:>9.3f}{outside / r['step_ms']:>8.1%}")
    lines.append(f"{'whole step':<30}{'':>6}{r['step_ms']:>9.3f}{1:>8.0%}{total_b / 1e6:>9.1f}"
                 f"{total_b / (r['step_ms'] / 1e3) / 1e9:>7.1f}{total_b / (r['step_ms'] / 1e3) / bw:>9.0%}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle")
    ap.add_argument("--prompts", default="128,1024")
    ap.add_argument("--tokens", type=int, default=24)
    a = parse_or_work(ap, worker, argv)
    if not a.bundle:
        ap.error("--bundle is required")
    results = []
    with tempfile.TemporaryDirectory(prefix="op_profile.") as tmp:
        for p in (int(x) for x in a.prompts.split(",")):
            job = {"bundle": a.bundle, "prompt": p, "tokens": a.tokens, "threads": a.threads, "tmp": tmp}
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                 text=True)
            if out.returncode:
                sys.exit(f"worker for prompt {p} failed: {out.stderr.strip().splitlines()[-1:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(table(r) + "\n", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
