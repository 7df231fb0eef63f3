"""emo-edge against itself: bundles (graph layouts) and onnxruntime session settings side by side, in fresh
processes alternating A B A B, at several prompt lengths.

    nice -n 10 python bench/variants.py --variant old=/tmp/peers/bundle --variant new=/tmp/peers/bundle_new \
        [--variant nospin=/tmp/peers/bundle_new:session.intra_op.allow_spinning=0] [--prompts 128,1024] \
        [--tokens 32] [--rounds 3] [--threads 2] [--json out.json]

A variant is NAME=BUNDLE[:KEY=VALUE,...]: the KEY=VALUE pairs are onnxruntime session config entries
(`SessionOptions.add_session_config_entry`) added on top of emo-edge's own options (emo_edge/engine/ort_session.py
session_options), e.g. session.intra_op.allow_spinning=0, session.intra_op_thread_affinities=1;2,
session.dynamic_block_base=4; the pseudo-entries `graph_optimization_level=disable|basic|extended|all` and
`threads=N` set those fields, `prefill_chunk=N` the engine's prompt chunk (tokens per prefill run). Each run
is bench/peers.py's emo worker (the engine, as `emo-edge run`): load, warm-up, prefill the prompt (the same
random ids for every variant), greedy decode `--tokens`. The table: per
variant and prompt the median prefill and decode tok/s (min-max), peak RSS, and the decode ratio to the first
variant taken round by round; the greedy tokens must agree with the first variant's (printed when not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_workers import parse_or_work  # noqa: E402  (the shared worker/argument tail)
LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}


def parse_variant(text: str) -> dict:
    name, _, rest = text.partition("=")
    bundle, _, cfg = rest.partition(":")
    if not name or not bundle:
        raise SystemExit(f"--variant {text!r}: expected NAME=BUNDLE[:KEY=VALUE,...]")
    config = dict(kv.split("=", 1) for kv in cfg.split(",") if kv)
    return {"name": name, "bundle": bundle, "config": config}


def apply_config(config: dict) -> None:
    """Wrap emo-edge's session options so that every session this worker makes gets `config`."""
    import onnxruntime as ort

    from emo_edge.engine import ort_session

    base = ort_session.session_options

    def patched(threads=None, *a, **kw):
        cfg = {k: v for k, v in config.items() if k != "prefill_chunk"}
        threads = int(cfg.pop("threads", threads or 0)) or threads
        so = base(threads, *a, **kw)
        if "graph_optimization_level" in cfg:
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                  LEVELS[cfg.pop("graph_optimization_level")])
        for k, v in cfg.items():
            so.add_session_config_entry(k, v)
        return so

    ort_session.session_options = patched
    import emo_edge.engine.static as static

    static.session_options = patched
    if "prefill_chunk" in config:  # not a session entry: the engine's prompt chunk (tokens per prefill run)
        from emo_edge.engine.base import Engine

        Engine.prefill_chunk = int(config["prefill_chunk"])


def worker(job: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    apply_config(job["config"])
    import peer_workers

    return peer_workers.worker_emo(job)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--prompts", default="128,1024")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = parse_or_work(ap, worker, argv)
    variants = [parse_variant(v) for v in a.variant]
    if len(variants) < 2:
        ap.error("give at least two --variant")
    import numpy as np

    prompts = [int(p) for p in a.prompts.split(",")]
    rng = np.random.default_rng(a.seed)
    ids = {p: rng.integers(300, 2700, p).tolist() for p in prompts}  # inside every tokenizer's byte-level range
    runs = {(v["name"], p): [] for v in variants for p in prompts}
    print(f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cpus; {a.rounds} rounds, "
          f"{a.threads} threads, {a.tokens} tokens", flush=True)
    for r in range(a.rounds):
        for p in prompts:
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                job = {"bundle": v["bundle"], "config": v["config"], "threads": a.threads, "ids": ids[p],
                       "tokens": a.tokens}
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                     text=True)
                if out.returncode:
                    sys.exit(f"{v['name']} at prompt {p}: {out.stderr.strip().splitlines()[-1:]}")
                runs[(v["name"], p)].append(json.loads(out.stdout.strip().splitlines()[-1]))
                last = runs[(v["name"], p)][-1]
                print(f"  round {r} prompt {p} {v['name']}: decode {last['decode_tok_s']:.2f} tok/s, prefill "
                      f"{last['prefill_tok_s']:.1f} tok/s", flush=True)
    first = variants[0]["name"]
    print(f"\n{'variant':<14}{'prompt':>7}{'prefill tok/s':>15}{'decode tok/s (min-max)':>25}{'peak RSS':>10}"
          f"{'decode vs ' + first:>18}{'prefill vs':>12}")
    for p in prompts:
        for v in variants:
            rs = runs[(v["name"], p)]
            dec = [x["decode_tok_s"] for x in rs]
            ratio = statistics.median(x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(rs, runs[(first, p)]))
            pre = statistics.median(x["prefill_tok_s"] / y["prefill_tok_s"] for x, y in zip(rs, runs[(first, p)]))
            same = all(x["tokens"] == y["tokens"] for x, y in zip(rs, runs[(first, p)]))
            print(f"{v['name']:<14}{p:>7}{statistics.median(x['prefill_tok_s'] for x in rs):>15.1f}"
                  f"{statistics.median(dec):>11.2f} ({min(dec):.2f}-{max(dec):.2f})"
                  f"{statistics.median(x['peak_rss'] for x in rs) / 1e9:>9.2f}G{ratio:>17.3f}x{pre:>11.3f}x"
                  + ("" if same else "  (greedy tokens differ from the first variant's)"))
    print(f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.json:
        Path(a.json).write_text(json.dumps({f"{k[0]}@{k[1]}": v for k, v in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
