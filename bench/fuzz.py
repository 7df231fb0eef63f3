"""The long fuzz campaign over every loader of hostile input (issue 14): property-based (hypothesis) mutants of
valid checkpoints, bundles, pool files, catalog entries, calibration text, targets and prepared stores, each run
in a watchdogged worker process under an audit hook.

    python bench/fuzz.py --iterations 100000 --out runs/fuzz            # the acceptance campaign
    python bench/fuzz.py --iterations 2000 --out runs/fuzz --targets config,bundle --seed 7
    python bench/fuzz.py --replay runs/fuzz/findings/config/1a2b3c4d-0 --out runs/fuzz

The mutators (tests/fuzz/mutate.py) are driven by a seeded random.Random per case by default (--engine random:
measured here ~90 cases/s on the cheap targets against ~25 under hypothesis, whose bookkeeping costs ~1 ms per
draw); --engine hypothesis runs the same mutators under hypothesis, as the short run in tests/security/test_fuzz.py does.

Iterations are split over the targets by their weight (tests/fuzz/targets.py): cheap in-process parsers get
most of them, the end-to-end loaders (onnxruntime sessions, a prepared store per mutated manifest) fewer; every
target gets at least --min-per-target. The run is pinned to one CPU (--cpu, default the last one) and the
worker to one onnxruntime thread. Prints one table: per target, iterations, outcomes (typed = an EmoEdgeError,
the good refusal; accepted = loaded and used fine; crash = any other exception or a dead worker; hang = over the
per-iteration limit), iterations that read outside the input directory, and seconds. Distinct findings with
their reproducers are listed after it and written to OUT/summary.json. Exit status 1 when anything crashed,
hung or read outside.

The audit hook sees Python's opens (and onnxruntime's model paths, and what is mapped or held open); for what
C/C++ code opens, run the campaign under strace and check its log afterwards:

    strace -f -qq -e trace=open,openat -e status=successful -o /tmp/fz.strace \
        python bench/fuzz.py --iterations 20000 --out runs/fuzz; \
        python bench/fuzz.py --out runs/fuzz --strace-report /tmp/fz.strace

The valid inputs are built under OUT/base once (with `cli.py synth` and `cli.py export`) and rebuilt when
emo_edge's sources change (or with --rebuild).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
if sys.path[2:3] == [str(Path(__file__).resolve().parent)]:  # bench/ itself: this file would shadow the package
    del sys.path[2]

from fuzz.harness import Campaign, replay, strace_report  # noqa: E402
from fuzz.targets import TARGET_LIST, TARGETS  # noqa: E402


def split(total: int, targets, minimum: int) -> dict[str, int]:
    weight = sum(t.weight for t in targets)
    return {t.name: max(minimum, round(total * t.weight / weight)) for t in targets}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--iterations", type=int, default=100_000, help="total over all targets")
    ap.add_argument("--out", required=True, help="run directory (bases cached here, findings written here)")
    ap.add_argument("--targets", default="all", help="comma-separated target names, or all: "
                    + ", ".join(TARGETS))
    ap.add_argument("--seed", type=int, default=None, help="seed (default: derandomized hypothesis / 0)")
    ap.add_argument("--engine", choices=("random", "hypothesis"), default="random",
                    help="who drives the mutators: a seeded PRNG (volume, default) or hypothesis (as in the tests)")
    ap.add_argument("--min-per-target", type=int, default=20)
    ap.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1, help="the one CPU to run on")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the base inputs")
    ap.add_argument("--replay", help="a findings/<target>/<id> directory: run that case once, in this process")
    ap.add_argument("--strace-report", metavar="LOG", help="after a run under strace (see above): list the files "
                    "its workers opened outside the input, the run's home and the Python/system locations")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {a.cpu})
    if a.strace_report:
        bad = strace_report(Path(a.strace_report), Path(a.out))
        print(f"strace: {len(bad)} files opened outside by the workers" + "".join(f"\n  {p}" for p in bad))
        return 1 if bad else 0
    if a.replay:
        res = replay(Path(a.replay), Path(a.out) / "base")
        print(res.pop("traceback") or "(no traceback)")
        print(json.dumps(res, indent=1))
        return 0
    chosen = TARGET_LIST if a.targets == "all" else [TARGETS[n] for n in a.targets.split(",")]
    plan = split(a.iterations, chosen, a.min_per_target)
    camp = Campaign(Path(a.out), cpu=a.cpu, rebuild=a.rebuild)
    t0 = time.perf_counter()
    try:
        for t in chosen:
            base = camp.check_base(t)
            if base["outcome"] != "accepted" or base["outside"]:
                print(f"warning: {t.name}: the unmutated base is {base['outcome']} ({base['error']}) "
                      f"{base['outside'] or ''}", flush=True)
            s = time.perf_counter()
            try:
                tally = camp.fuzz(t, plan[t.name], a.seed, a.engine)
            except LookupError as exc:
                print(f"warning: {t.name}: not fuzzed: {exc}", flush=True)
                continue
            print(f"{t.name}: {tally.iterations} iterations in {time.perf_counter() - s:.0f} s "
                  f"{tally.counts} outside {tally.outside}", flush=True)
            camp.summary()  # the table so far is in OUT/summary.json after every target
    except KeyboardInterrupt:
        print("interrupted: the table covers the targets run so far", flush=True)
    finally:
        camp.close()
    summary = camp.summary()
    print()
    print(camp.table())
    print(f"\nwall {time.perf_counter() - t0:.0f} s; findings: {len(summary['findings'])} (OUT/summary.json)")
    for f in summary["findings"]:
        print(f"  {f['target']}: {f['count']}x {f['signature']}\n      {f['error'][:200]}"
              f"{' ' + str(f['outside'][:2]) if f['outside'] else ''}\n      reproducer: {f['reproducers'][0]}")
    bad = any(t.counts["crash"] or t.counts["hang"] or t.outside for t in camp.tallies.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
