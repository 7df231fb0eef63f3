"""One operator at the emo-14b width, per quantization block size: resident bytes after onnxruntime prepacks it and
its time per decode step (T=1) and per prefill chunk (T=256), in fresh processes alternating A B A B.

    nice -n 10 python bench/op_layout.py [--blocks 64,128] [--rounds 3] [--experts 53] [--threads 2]

Ops: `qmoe` (one QMoE of `--experts` SwiGLU experts, hidden 2048, intermediate 1024, k 8, int4 symmetric, fp32
scales: a MoE layer of a 52-expert pool union + its shared expert) and `matmul` (MatMulNBits [2048 -> 8192], int4),
both at accuracy_level 4 (int8 activations, the exporter's setting). Weights are random codes (speed and memory do
not depend on their values). "resident" = RssAnon after the session is built minus before (the external data file
is mapped; onnxruntime prepacks into anonymous memory and the loaders release the file's pages); bits/weight =
resident * 8 / weights. This is what the planner's `prepacked_extra` charges (emo_edge/plan/sizing.py) and what
targets/cpu.json's fallback layout rests on.
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
from pathlib import Path

H, I, K_ACTIVE, N_MATMUL = 2048, 1024, 8, 8192


def anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def build(op: str, block: int, experts: int, path: Path) -> int:
    """Write the one-node model (external data); returns its weight count."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    u8 = lambda *s: numpy_helper.from_array(rng.integers(0, 255, s, dtype=np.uint8))  # noqa: E731
    f32 = lambda *s: numpy_helper.from_array((rng.random(s) * 0.01).astype(np.float32))  # noqa: E731
    if op == "qmoe":
        inits = [u8(experts, 2 * I, H // 2), f32(experts, 2 * I, H // block), u8(experts, H, I // 2),
                 f32(experts, H, I // block)]
        for t, n in zip(inits, ("w1", "s1", "w2", "s2")):
            t.name = n
        node = helper.make_node("QMoE", ["x", "r", "w1", "s1", "", "w2", "s2"], ["y"], domain="com.microsoft",
                                k=K_ACTIVE, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                                activation_beta=0.0, normalize_routing_weights=0, use_sparse_mixer=0,
                                quant_type="int", expert_weight_bits=4, block_size=block, accuracy_level=4,
                                weights_prepacked=0)
        ins = [("x", H), ("r", experts)]
        n_weights = experts * 3 * H * I
    else:
        inits = [u8(N_MATMUL, H // block, block // 2), f32(N_MATMUL * (H // block))]
        for t, n in zip(inits, ("B", "S")):
            t.name = n
        node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=H, N=N_MATMUL,
                                bits=4, block_size=block, accuracy_level=4)
        ins = [("x", H)]
        n_weights = N_MATMUL * H
    out_dim = H if op == "qmoe" else N_MATMUL
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["T", d])
                                           for n, d in ins],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", out_dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return n_weights


def worker(job: dict) -> dict:
    import numpy as np

    from emo_edge.engine.ort_session import cpu_session
    import onnxruntime as ort

    before = anon()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = job["threads"]
    sess = cpu_session(job["path"], opts)
    resident = anon() - before
    rng = np.random.default_rng(1)
    names = [i.name for i in sess.get_inputs()]
    out = {"resident": resident}
    for t, n in ((1, 40), (256, 3)):
        feed = {"x": rng.standard_normal((t, H)).astype(np.float32)}
        if "r" in names:
            feed["r"] = rng.standard_normal((t, job["experts"])).astype(np.float32)
        sess.run(None, feed)
        t0 = time.perf_counter()
        for _ in range(n):
            sess.run(None, feed)
        out[f"ms_t{t}"] = (time.perf_counter() - t0) / n * 1e3
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="64,128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--experts", type=int, default=53)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    blocks = [int(b) for b in a.blocks.split(",")]
    print(f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cpus; "
          f"{a.rounds} rounds alternating, {a.threads} threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="op_layout.") as tmp:
        jobs = {}
        for op in ("qmoe", "matmul"):
            for b in blocks:
                path = Path(tmp) / f"{op}_{b}.onnx"
                n = build(op, b, a.experts, path)
                file_bytes = path.stat().st_size + Path(str(path) + ".data").stat().st_size
                jobs[(op, b)] = {"path": str(path), "threads": a.threads, "experts": a.experts, "n": n,
                                 "file": file_bytes, "runs": []}
        for r in range(a.rounds):
            for key in (list(jobs) if r % 2 == 0 else list(jobs)[::-1]):
                j = jobs[key]
                job = {k: j[k] for k in ("path", "threads", "experts")}
                p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                   text=True, check=True)
                j["runs"].append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"\n{'op':<8}{'block':>6}{'file MB':>9}{'resident MB':>13}{'bits/w file':>12}{'bits/w res':>11}"
          f"{'ms T=1':>9}{'ms T=256':>10}{'T=1 vs first':>13}")
    for op in ("qmoe", "matmul"):
        first = None
        for b in blocks:
            j = jobs[(op, b)]
            med = lambda k: statistics.median(r[k] for r in j["runs"])  # noqa: E731
            t1 = med("ms_t1")
            first = first or t1
            print(f"{op:<8}{b:>6}{j['file'] / 1e6:>9.1f}{med('resident') / 1e6:>13.1f}"
                  f"{j['file'] * 8 / j['n']:>12.3f}{med('resident') * 8 / j['n']:>11.3f}{t1:>9.2f}"
                  f"{med('ms_t256'):>10.1f}{first / t1:>12.2f}x")
    print(f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
