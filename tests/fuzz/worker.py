"""The worker process: materialises one case as an input directory, runs the target's loader on it under an
audit hook, and classifies the outcome. The harness runs it in a separate process (multiprocessing "spawn") so
that a hang can be killed and a hard crash (a signal) is seen as one.

What counts as a read outside the input: every path given to `open`/`os.open`, `os.listdir`/`os.scandir`
(Python's audit events), to `onnxruntime.InferenceSession`, and every file mapped into or held open by the
process while the loaded object is alive (/proc/self/maps and /proc/self/fd, which also catch what C++ code
opened), resolved through symlinks, outside the input directory, the run's EMO_EDGE_HOME and the Python
installation / system libraries.
"""

from __future__ import annotations

import os
import resource
import shutil
import site
import sys
import sysconfig
import time
import traceback
from pathlib import Path

READY_MARK = "fuzz-worker-ready"
MEMORY_LIMIT = 8 << 30  # address space per worker: a loader that tries to allocate more fails, it is not killed
SYSTEM_ROOTS = ["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share/zoneinfo", "/etc/ld.so.cache",
                "/etc/localtime", "/proc/self", f"/proc/{os.getpid()}", "/proc/cpuinfo", "/proc/meminfo",
                "/proc/stat", "/sys/devices/system/cpu", "/sys/fs/cgroup", "/dev/null", "/dev/urandom", "/dev/shm",
                "/dev/zero",  # a device, not data: a loader that reads it unbounded shows up as a hang or crash
                "/proc/sys/kernel/random/boot_id",  # read by onnxruntime itself, whatever the input
                os.path.expanduser("~/.cache/Microsoft/DeveloperTools")]  # onnxruntime's own device-id store


class Audit:
    """Records the paths opened while active."""

    def __init__(self):
        self.active = False
        self.paths: list[str] = []

    def hook(self, event: str, args) -> None:
        if self.active and event in ("open", "os.listdir", "os.scandir") and args:
            p = args[0]
            if isinstance(p, (str, bytes, os.PathLike)):
                self.paths.append((event, os.fsdecode(p)))


AUDIT = Audit()


def _runtime_roots() -> list[str]:
    here = Path(__file__).resolve()
    repo = here.parents[2]
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sysconfig.get_paths()["stdlib"],
             str(here.parent), str(repo / "emo_edge"), str(repo / "exporters"), str(repo / "targets"),
             str(repo / "emo_edge.egg-info")}
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    return sorted({os.path.realpath(r) for r in roots} | set(SYSTEM_ROOTS))


def _inside(real: str, roots: list[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


def _mapped_and_open() -> list[str]:
    """Files the process maps or holds open now."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    out.append(parts[5].strip().removesuffix(" (deleted)"))
        for fd in os.listdir("/proc/self/fd"):
            try:
                t = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if t.startswith("/"):
                out.append(t.removesuffix(" (deleted)"))
    except OSError:
        pass
    return out


class Env:
    """What a target's loader gets besides its input directory."""

    def __init__(self, base: Path, work: Path):
        self.base, self.work = base, work
        self.cache: dict = {}
        self.probed: list[str] = []

    def untracked(self, key: str, make):
        """env.cache[key], made on first use with the audit paused (base inputs are not the case's reads)."""
        if key not in self.cache:
            was, AUDIT.active = AUDIT.active, False
            try:
                self.cache[key] = make()
            finally:
                AUDIT.active = was
        return self.cache[key]

    def probe(self) -> None:
        """Called by a loader while what it loaded is alive: snapshot mapped and open files."""
        was, AUDIT.active = AUDIT.active, False
        self.probed.extend(_mapped_and_open())
        AUDIT.active = was


def _wrap_onnxruntime() -> None:
    """Record the model path given to every InferenceSession (C++ opens it, no audit event)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    cls = ort.InferenceSession
    if getattr(cls, "_fuzz_wrapped", False):
        return
    orig = cls.__init__

    def init(self, path_or_bytes, *a, **kw):
        if AUDIT.active and isinstance(path_or_bytes, (str, os.PathLike)):
            AUDIT.paths.append(("onnxruntime", os.fspath(path_or_bytes)))
        return orig(self, path_or_bytes, *a, **kw)

    cls.__init__ = init
    cls._fuzz_wrapped = True


def materialise(src: Path, dest: Path, overlay: dict, copy: bool = False) -> None:
    """`dest` = the files of `src` (hard links, or copies) with `overlay` applied: name -> bytes (write),
    None (delete), {"symlink": target}."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for p in sorted(src.rglob("*")):
        rel = str(p.relative_to(src))
        if p.is_dir():
            (dest / rel).mkdir(exist_ok=True)
        elif rel not in overlay:
            (shutil.copy2 if copy else os.link)(p, dest / rel)
    for rel, v in overlay.items():
        q = dest / rel
        q.parent.mkdir(parents=True, exist_ok=True)
        if v is None:
            continue
        if isinstance(v, dict):
            os.symlink(v["symlink"], q)
        else:
            q.write_bytes(v)


def rehash_manifest(d: Path, changed) -> None:
    """What an attacker does after editing bundle files: update their sizes and sha256 in manifest.json."""
    import hashlib
    import json

    p = d / "manifest.json"
    if p.is_symlink() or not p.is_file() or p.stat().st_size > 64 << 20:  # the case replaced it: leave it so
        return
    try:
        m = json.loads(p.read_bytes())
        for name in changed:
            p = d / name
            if name != "manifest.json" and name in m["files"] and p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                m["files"][name].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        (d / "manifest.json").unlink()
        (d / "manifest.json").write_text(json.dumps(m, indent=1))
    except Exception:  # an unparseable or odd manifest stays as the case made it
        pass


def prepare_input(target, case: dict, env: Env) -> Path:
    inp = env.work / "in"
    materialise(env.base / target.base, inp, case.get("files", {}))
    if case.get("rehash"):
        rehash_manifest(inp, case.get("files", {}))
    if target.home:
        materialise(env.base / "home", env.work / "home", case.get("home_files", {}), copy=True)
    return inp


def run_case(target, case: dict, env: Env) -> dict:
    """One iteration: {"outcome", "seconds", "error", "where", "traceback", "outside"}."""
    from emo_edge.errors import EmoEdgeError

    inp = prepare_input(target, case, env)
    roots = [os.path.realpath(inp), os.path.realpath(env.work / "home")] + env.cache.setdefault(
        "roots", _runtime_roots())
    res = {"outcome": "accepted", "error": "", "where": "", "traceback": ""}
    AUDIT.paths, env.probed = [], []
    held_before = set(_mapped_and_open()) if target.probes else set()  # the worker's own: not this case's
    t0 = time.perf_counter()
    AUDIT.active = True
    try:
        target.run(inp, env)
    except EmoEdgeError as exc:
        res.update(outcome="typed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # anything else is what we are looking for (a Rust panic is a BaseException)
        tb = traceback.extract_tb(exc.__traceback__)
        last = tb[-1] if tb else None
        res.update(outcome="crash", error=f"{type(exc).__name__}: {str(exc)[:300]}",
                   where=f"{last.filename}:{last.lineno} in {last.name}" if last else "",
                   traceback="".join(traceback.format_exception(exc))[-4000:])
    finally:
        AUDIT.active = False
    res["seconds"] = time.perf_counter() - t0
    seen = {}
    for event, p in AUDIT.paths + [("held", p) for p in env.probed if p not in held_before]:
        real = os.path.realpath(p)  # a relative name is relative to the cwd (the worker's work directory)
        if _inside(real, roots) or not os.path.exists(real):  # only what exists can be read
            continue
        if event == "open" and os.path.isdir(real):  # opening a directory reads nothing (listing it does)
            continue
        seen.setdefault(real, f"{event} {real}")
    res["outside"] = sorted(seen.values())[:10]
    return res


def setup(work: Path) -> None:
    os.environ["EMO_EDGE_HOME"] = str(work / "home")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ValueError, OSError):
        pass
    import logging
    logging.disable(logging.CRITICAL)
    sys.addaudithook(AUDIT.hook)
    _wrap_onnxruntime()
    # import what the loaders import lazily, so that the first case does not count the imports' opens
    import emo_edge.bundle.files, emo_edge.model.checkpoint, emo_edge.pools.catalog, emo_edge.pools.calib  # noqa: E401,F401
    import emo_edge.engine, emo_edge.engine.swappable.mapped, emo_edge.model.spec, emo_edge.model.tokenizer, onnx, targets  # noqa
    import tokenizers  # noqa: F401
    _first_session()


def _first_session() -> None:
    """One onnxruntime session on a one-node model, so that what onnxruntime opens once per process (device
    discovery, its device-id store, locale and certificates) is opened before the first case."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "warm", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    del onnx


def serve(conn, base: str, work: str, cpu: int | None = None) -> None:
    """The worker loop: receives (target name, case), answers with run_case's result; None stops it."""
    from .targets import ALL_TARGETS as TARGETS

    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    env = Env(Path(base), Path(work))
    env.work.mkdir(parents=True, exist_ok=True)
    setup(env.work)
    os.chdir(env.work)
    os.close(os.open(READY_MARK, os.O_WRONLY | os.O_CREAT, 0o644))  # strace_report counts opens after this one
    conn.send(("ready", os.getpid()))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        name, case = msg
        conn.send(run_case(TARGETS[name], case, env))
