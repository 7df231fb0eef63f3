"""Retrain emo-tiny and stdmoe-tiny from scratch: `python -m emo_edge.train`.

Builds the corpus and tokenizer once (work directory, default runs/train), then trains the EMO model and its
standard-MoE twin in two parallel processes (one thread each) and writes both into --out (default
emo_edge/models). `--quick` runs a tiny smoke configuration (seconds) sequentially.

A run stopped at any point (a killed process, a closed session) continues from its last saved state when started
again with the same --work: `python -m emo_edge.train --skip-data --work DIR` (states are saved every 10 minutes).
`--finalize` measures the written models' held-out task accuracy and rewrites their model cards (what a run does
at its end; for models written by a run that predates it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from .config import MODEL_NAMES, TrainConfig, quick_config
from .loop import train_one
from .prepare import prepare_data

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "models"


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def build_config(args) -> TrainConfig:
    cfg = quick_config() if args.quick else TrainConfig()
    over = {k: getattr(args, k) for k in ("steps", "batch", "seed", "lr") if getattr(args, k) is not None}
    return replace(cfg, **over)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emo_edge.train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where emo-tiny/ and stdmoe-tiny/ are written")
    ap.add_argument("--work", type=Path, default=Path("runs/train"), help="data, logs, intermediate checkpoints")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (a few steps, tiny sizes)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--only", choices=["emo", "topk"], help="train only one of the two models")
    ap.add_argument("--jobs", type=int, default=None, help="parallel training processes (default 2; 1 with --quick)")
    ap.add_argument("--skip-data", action="store_true", help="reuse the prepared data in --work")
    ap.add_argument("--finalize", action="store_true", help="re-measure held-out task accuracy of the models in "
                    "--out and rewrite their model cards from the results in --work")
    ap.add_argument("--worker", choices=["emo", "topk"], help=argparse.SUPPRESS)
    ap.add_argument("--command", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = build_config(args)
    command = args.command or "python -m emo_edge.train" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    if args.worker:
        train_one(args.worker, cfg, args.work, args.out, command, log=_log)
        return 0
    if args.finalize:
        from .loop import finalize

        for k in [args.only] if args.only else ["emo", "topk"]:
            finalize(k, cfg, args.work, args.out, command, log=_log)
        return 0
    if not args.skip_data:
        prepare_data(cfg, args.work, log=_log)
    kinds = [args.only] if args.only else ["emo", "topk"]
    jobs = args.jobs or (1 if args.quick else 2)
    results = {}
    if jobs == 1:
        for k in kinds:
            results[k] = train_one(k, cfg, args.work, args.out, command, log=_log)
    else:
        passthru = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--skip-data"]
        procs = {}
        for k in kinds:
            logf = open(args.work / f"{MODEL_NAMES[k]}.log", "w")
            procs[k] = subprocess.Popen([sys.executable, "-m", "emo_edge.train", *passthru, "--skip-data",
                                         "--worker", k, "--command", command], stdout=logf, stderr=subprocess.STDOUT)
            _log(f"started {MODEL_NAMES[k]} (pid {procs[k].pid}), log {args.work / (MODEL_NAMES[k] + '.log')}")
        bad = 0
        for k, p in procs.items():
            rc = p.wait()
            _log(f"{MODEL_NAMES[k]} finished with status {rc}")
            bad |= rc != 0
            res = args.work / f"{MODEL_NAMES[k]}.result.json"
            if res.is_file():
                results[k] = json.loads(res.read_text())
        if bad:
            return 1
    if not args.quick:  # the embedded models ship their built-in pools (emo-edge reads them read-only)
        from ..pools.catalog import ship_builtin_pools

        for k in kinds:
            for path in ship_builtin_pools(args.out / MODEL_NAMES[k]):
                _log(f"shipped pool {path}")
    for k, r in results.items():
        _log(f"{r['name']}: train ce {r['final_train_ce']:.4f}, held-out " +
             " ".join(f"{n} {v:.3f}" for n, v in r["final_heldout"].items()))
    _log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
