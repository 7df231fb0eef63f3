"""Decode with the shared past/present KV buffer (the engine's DecodeSession) against the copy-based decoder I/O
(separate past and present tensors, each step's present fed back: what the runtimes did before), on one static
bundle, fresh processes alternating A B A B.

    nice -n 10 python bench/kv_share.py BUNDLE [--prompts 128,1024] [--tokens 32] [--pairs 2] [--threads 2]

Prints per prompt length: decode tok/s of each side (min/median/max), the ratio pair by pair (median), and
whether the greedy tokens are identical (they must be).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(bundle: str, side: str, prompt: int, tokens: int, threads: int) -> dict:
    from emo_edge.engine import StaticEngine
    from emo_edge.engine.session import decoder_feed

    eng = StaticEngine(bundle, threads=threads)
    ids = [int(x) for x in np.random.default_rng(0).integers(3, min(eng.vocab_size, 4000), prompt)]
    if side == "shared":
        s = eng.session(prompt + tokens)
        logits = s.prefill(ids)
        step = lambda t: s.feed([t])  # noqa: E731
    else:
        sess, names = eng.session_, [o.name for o in eng.session_.get_outputs()]
        state = {"cache": [np.zeros((1, eng.kv_heads, 0, eng.head_dim), eng.kv_dtype)] * (2 * eng.n_layers)}

        def step(t, chunk=None):
            res = dict(zip(names, sess.run(None, decoder_feed(chunk or [t], state["cache"], eng.context,
                                                              eng.vocab_size, eng.n_layers))))
            state["cache"] = [res[f"present.{i}.{kv}"] for i in range(eng.n_layers) for kv in ("key", "value")]
            return res["logits"][0]
        for a in range(0, prompt, eng.prefill_chunk):
            logits = step(None, ids[a:a + eng.prefill_chunk])
    out = [int(np.argmax(logits[-1]))]
    t0 = time.perf_counter()
    for _ in range(tokens - 1):
        out.append(int(np.argmax(step(out[-1])[-1])))
    dt = time.perf_counter() - t0
    return {"side": side, "prompt": prompt, "decode_tok_s": (tokens - 1) / dt, "tokens": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--prompts", default="128,1024")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        print(json.dumps(worker(a.bundle, a._worker[0], int(a._worker[1]), a.tokens, a.threads)))
        return
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, {a.threads} threads")
    print("| prompt | copy tok/s (min/med/max) | shared tok/s (min/med/max) | shared/copy (median of pairs) | same tokens |")
    print("|---|---|---|---|---|")
    for prompt in [int(p) for p in a.prompts.split(",")]:
        runs: dict[str, list] = {"copy": [], "shared": []}
        for _ in range(a.pairs):
            for side in ("copy", "shared"):
                r = subprocess.run([sys.executable, __file__, a.bundle, "--tokens", str(a.tokens), "--threads",
                                    str(a.threads), "--_worker", side, str(prompt)], capture_output=True, text=True)
                if r.returncode:
                    sys.exit(r.stderr.strip().splitlines()[-1])
                runs[side].append(json.loads(r.stdout.strip().splitlines()[-1]))
        c, s = ([x["decode_tok_s"] for x in runs[k]] for k in ("copy", "shared"))
        same = all(x["tokens"] == y["tokens"] for x, y in zip(runs["copy"], runs["shared"]))
        fmt = lambda v: f"{min(v):.1f} / {np.median(v):.1f} / {max(v):.1f}"  # noqa: E731
        print(f"| {prompt} | {fmt(c)} | {fmt(s)} | {np.median([y / x for x, y in zip(c, s)]):.2f}x | {same} |")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
