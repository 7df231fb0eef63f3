"""The campaign: hypothesis generates each target's cases, a worker process runs them under a watchdog, and
every crash, hang or outside read is saved as a reproducer under OUT/findings/<target>/<n>/ (case.json plus
the mutated files), replayable with `python bench/fuzz.py --replay DIR`.

    out/base/       the valid inputs (bases.py), cached
    out/work/       the worker's scratch: in/ (the input of the current case), home/, and decoy/ next to it
    out/findings/   reproducers;  out/summary.json  the per-target table and the distinct findings
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import multiprocessing as mp
import re
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, Verbosity, given, seed as hseed, settings
from hypothesis.errors import HypothesisWarning

from . import bases, mutate
from .targets import ALL_TARGETS, Target

log = logging.getLogger("fuzz")
OUTCOMES = ("typed", "accepted", "crash", "hang")
KEEP_PER_SIGNATURE = 3  # reproducers saved per distinct finding


@dataclass
class Tally:
    iterations: int = 0
    counts: dict = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    outside: int = 0
    seconds: float = 0.0


class Worker:
    """One worker process, restarted after a hang or a death."""

    def __init__(self, base: Path, work: Path, cpu: int | None = None):
        self.base, self.work, self.cpu = base, work, cpu
        self.proc = None
        self.ctx = mp.get_context("spawn")

    def start(self) -> None:
        from . import worker

        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=worker.serve, args=(child, str(self.base), str(self.work), self.cpu),
                                     daemon=True)
        self.proc.start()
        child.close()
        msg = self.conn.recv() if self.conn.poll(300) else None
        if not (isinstance(msg, tuple) and msg[0] == "ready"):
            raise RuntimeError("the fuzz worker did not start")
        with open(self.work / "worker_pids.txt", "a") as f:  # for strace_report
            f.write(f"{msg[1]}\n")

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.proc = None

    def run(self, target: Target, case: dict) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self.start()
        t0 = time.perf_counter()
        self.conn.send((target.name, case))
        if self.conn.poll(target.timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
            self.proc.join(5)
            code = self.proc.exitcode
            self.proc = None
            return {"outcome": "crash", "error": f"worker died (exit code {code})", "where": "", "traceback": "",
                    "outside": [], "seconds": time.perf_counter() - t0}
        self.proc.kill()
        self.proc.join()
        self.proc = None
        return {"outcome": "hang", "error": f"no result after {target.timeout:.0f} s", "where": "", "traceback": "",
                "outside": [], "seconds": time.perf_counter() - t0}


def encode_case(case: dict) -> dict:
    """case.json form: bytes as base64 (the files themselves are also written out for reading)."""
    def enc(files):
        return {k: (v if v is None or isinstance(v, dict) else {"base64": base64.b64encode(v).decode()})
                for k, v in files.items()}
    return {k: (enc(v) if k in ("files", "home_files") else v) for k, v in case.items()}


def decode_case(data: dict) -> dict:
    def dec(files):
        return {k: (base64.b64decode(v["base64"]) if isinstance(v, dict) and "base64" in v else v)
                for k, v in files.items()}
    return {k: (dec(v) if k in ("files", "home_files") else v) for k, v in data.items()}


class Campaign:
    def __init__(self, out: Path, cpu: int | None = None, rebuild: bool = False):
        self.out = Path(out).resolve()
        self.base = bases.build(self.out / "base", rebuild)
        self.work = self.out / "work"
        names = bases.make_decoys(self.base, self.work / "decoy")
        self.ctx = mutate.Ctx(str(self.work / "decoy"), "../decoy", names)
        self.files = {b: bases.read_files(self.base / b) for b in bases.BASES}
        self.worker = Worker(self.base, self.work, cpu)
        self.tallies: dict[str, Tally] = {}
        self.findings: dict[str, dict] = {}  # signature -> first finding
        self.base_results: dict[str, dict] = {}

    # ---- one target ------------------------------------------------------------------------------------
    def check_base(self, target: Target) -> dict:
        """The unmutated base must load: else the target fuzzes nothing but the first refusal."""
        res = self.worker.run(target, {"files": {}})
        self.base_results[target.name] = res
        return res

    def fuzz(self, target: Target, iterations: int, seed: int | None = None, engine: str = "hypothesis") -> Tally:
        """`iterations` cases of `target`. engine "hypothesis": drawn by hypothesis (derandomized when seed is
        None); "random": the same mutators driven by a random.Random per case (~3x the cases per second)."""
        tally = self.tallies.setdefault(target.name, Tally())
        t0 = time.perf_counter()
        try:
            self._fuzz(target, iterations, seed, engine, tally)
        finally:
            tally.seconds += time.perf_counter() - t0  # wall: generation, the worker, and restarts
        return tally

    def _fuzz(self, target: Target, iterations: int, seed: int | None, engine: str, tally: Tally) -> None:
        make = target.cases(self.ctx, self.files[target.base], self.files["home"])
        if engine == "random":
            start = (seed or 0) * 10**9 + zlib.crc32(target.name.encode()) * 10**4
            for i in range(iterations):
                case = make(mutate.PyRand(start + i))
                self.record(target, case, self.worker.run(target, case), tally)
            return

        @settings(max_examples=iterations, database=None, deadline=None, derandomize=seed is None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
        @given(mutate.strategy(make))
        def one(case):
            self.record(target, case, self.worker.run(target, case), tally)

        if seed is not None:
            one = hseed(seed)(one)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HypothesisWarning)  # reprs of large base files
            one()

    def record(self, target: Target, case: dict, res: dict, tally: Tally) -> None:
        tally.iterations += 1
        tally.counts[res["outcome"]] += 1
        if res["outside"]:
            tally.outside += 1
            self.save(target, case, res, f"outside {Path(res['outside'][0]).name}", "outside")
        if res["outcome"] in ("crash", "hang"):
            sig = f"{res['outcome']} {res['error'].split(':')[0]} at {res['where']}"
            self.save(target, case, res, sig, res["outcome"])

    def save(self, target: Target, case: dict, res: dict, sig: str, kind: str) -> None:
        key = f"{target.name}|{sig}"
        f = self.findings.setdefault(key, {"target": target.name, "kind": kind, "signature": sig, "count": 0,
                                           "error": res["error"], "where": res["where"], "outside": res["outside"],
                                           "reproducers": []})
        f["count"] += 1
        if len(f["reproducers"]) >= KEEP_PER_SIGNATURE:
            return
        h = hashlib.sha256(key.encode()).hexdigest()[:8]
        d = self.out / "findings" / target.name / f"{h}-{len(f['reproducers'])}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "case.json").write_text(json.dumps({"target": target.name, "case": encode_case(case), "result": res},
                                                indent=1))
        for group in ("files", "home_files"):
            for name, v in case.get(group, {}).items():
                if isinstance(v, bytes):
                    p = d / group / name
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(v)
        f["reproducers"].append(str(d))

    # ---- the report -----------------------------------------------------------------------------------
    def table(self) -> str:
        head = f"{'target':<20} {'iterations':>10} {'typed':>8} {'accepted':>8} {'crash':>6} {'hang':>5} " \
               f"{'outside':>7} {'seconds':>8}"
        rows = [head, "-" * len(head)]
        total = Tally()
        for name, t in self.tallies.items():
            rows.append(f"{name:<20} {t.iterations:>10} {t.counts['typed']:>8} {t.counts['accepted']:>8} "
                        f"{t.counts['crash']:>6} {t.counts['hang']:>5} {t.outside:>7} {t.seconds:>8.1f}")
            total.iterations += t.iterations
            total.outside += t.outside
            total.seconds += t.seconds
            for k in OUTCOMES:
                total.counts[k] += t.counts[k]
        rows.append("-" * len(head))
        rows.append(f"{'total':<20} {total.iterations:>10} {total.counts['typed']:>8} {total.counts['accepted']:>8} "
                    f"{total.counts['crash']:>6} {total.counts['hang']:>5} {total.outside:>7} {total.seconds:>8.1f}")
        return "\n".join(rows)

    def summary(self) -> dict:
        data = {"tallies": {k: {"iterations": t.iterations, **t.counts, "outside": t.outside,
                                "seconds": round(t.seconds, 2)} for k, t in self.tallies.items()},
                "base": {k: {"outcome": v["outcome"], "error": v["error"], "outside": v["outside"]}
                         for k, v in self.base_results.items()},
                "findings": sorted(self.findings.values(), key=lambda f: (f["target"], f["signature"]))}
        (self.out / "summary.json").write_text(json.dumps(data, indent=1))
        return data

    def close(self) -> None:
        self.worker.stop()


def replay(finding_dir: Path, base_root: Path) -> dict:
    """Run a saved case once, in this process (tracebacks visible); returns the result."""
    from . import worker

    data = json.loads((Path(finding_dir) / "case.json").read_text())
    target = ALL_TARGETS[data["target"]]
    work = Path(finding_dir).resolve() / "replay"
    env = worker.Env(Path(base_root).resolve(), work)
    work.mkdir(exist_ok=True)
    worker.setup(work)
    return worker.run_case(target, decode_case(data["case"]), env)


STRACE_LINE = re.compile(r'^(\d+)\s+(?:open\(|openat2?\(AT_FDCWD, )"((?:[^"\\]|\\.)*)"')


def strace_report(log: Path, out: Path) -> list[str]:
    """The independent check: files the workers opened (successfully, by name: not relative to another
    directory's descriptor) after their start-up, outside the allowed places, from
    `strace -f -e trace=open,openat -e status=successful -o LOG python bench/fuzz.py ... --out OUT`. Sees what
    C and C++ code (onnxruntime, tokenizers) opened too, which the audit hook cannot."""
    import os

    from . import worker

    out = Path(out).resolve()
    pids = set((out / "work" / "worker_pids.txt").read_text().split())
    roots = [os.path.realpath(out / "work" / "in"), os.path.realpath(out / "work" / "home"),
             os.path.realpath(out / "base")] + worker._runtime_roots() + [f"/proc/{p}" for p in pids]
    bad, ready = set(), set()
    for line in Path(log).read_text(errors="replace").splitlines():
        m = STRACE_LINE.match(line)
        if not m or m.group(1) not in pids:
            continue
        path = m.group(2).encode().decode("unicode_escape", "replace")
        if path == worker.READY_MARK:  # the worker's own start-up is not a case's doing
            ready.add(m.group(1))
            continue
        if m.group(1) not in ready:
            continue
        real = os.path.realpath(os.path.join(out / "work", path))  # the worker's cwd is out/work
        if not worker._inside(real, roots) and not os.path.isdir(real):
            bad.add(real)
    return sorted(bad)
