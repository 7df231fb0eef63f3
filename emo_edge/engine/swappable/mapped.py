"""Mapped MoE layers: one onnxruntime session per layer over the UNION of the exported experts, built once, with
the experts' prepacked weights memory-mapped from a per-machine prepared store; a pool swap changes which experts'
pages are resident and the routing mask, and never rebuilds a session.

Why (measured, onnxruntime 1.32 CPU, emo-14b width, see bench/swap.py): rebuilding a pool's QMoE session costs
QMoE's prepack of every expert of the pool (~150 ms per 32-expert layer, single-threaded, ~700 MB/s), so the
rebuild design sat at ~5x the disk-read floor. onnxruntime can save prepacked constant initializers
("session.save_external_prepacked_constant_initializers") and, when it loads them back, uses the mmap'd bytes
directly (it re-derives them once at load to validate: "Serialized pre-packed weights ... do not match" on
a stale store). So:

  prepare (once per bundle, onnxruntime version and CPU; `$EMO_EDGE_HOME/prepared/<key>/`; prepared.py):
      per MoE layer, the union block with every expert (raw shards verified against the manifest's sha256) is
      saved with its prepacked weights; prepared.json records, per layer, where each expert's prepacked fc1 and
      fc2 bytes lie in moe{m}.data and their sha256.
  open:
      per layer, the session is created from moe{m}.onnx (onnxruntime maps moe{m}.data), then every page it
      touched while validating is dropped again (madvise DONTNEED + posix_fadvise DONTNEED): RSS = backbone.
  swap:
      evict (DONTNEED the pages of least-recently-used experts outside the new pool, and drop them from the page
      cache), then load each missing expert (MADV_POPULATE_READ on onnxruntime's own mapping of its bytes, so
      they are read from disk once and never copied) and check its sha256 straight from those pages; two
      experts are in flight at once so reading and hashing overlap. Only when every expert verified is the
      routing mask switched: a failing expert aborts the swap with the old pool still serving.

Routing in the union block equals the static bundle of the pool bit for bit: the router logits of the pool's
experts are gathered (ascending source order = the static remap), soft-maxed at the pool's width exactly as the
static graph does, and scattered back; QMoE selects its top-k on the union logits with -inf outside the pool, so
it picks the same experts in the same order and runs the same prepacked kernels on the same bytes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import BundleError

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
PREPARED_VERSION = 2  # 2: prepared.json holds `fixed_sha256` (graph + non-expert weights)
POOL_IDX = "/emo_edge/pool_idx"
MASK = "/emo_edge/mask"
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc


def madvise(addr: int, length: int, advice: int) -> int:
    """0 or errno."""
    if length <= 0:
        return 0
    r = _lib().madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice)
    return ctypes.get_errno() if r else 0


def supported() -> str | None:
    """None when the mapped mechanism can run here, else why not."""
    if platform.system() != "Linux":
        return "needs Linux madvise"
    try:
        import onnxruntime as ort
        major, minor = (int(x) for x in ort.__version__.split(".")[:2])
    except Exception:  # noqa: BLE001 - any import/version problem means: use the rebuild mechanism
        return "onnxruntime version unknown"
    if (major, minor) < (1, 22):
        return f"onnxruntime {ort.__version__} cannot load prepacked weights from external data (needs 1.22+)"
    try:
        _lib()
    except OSError:
        return "libc not found"
    return None


def cpu_signature() -> str:
    """What the prepacked layout may depend on: onnxruntime version, machine, the CPU's feature flags."""
    import onnxruntime as ort
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    h = hashlib.sha256(f"{ort.__version__}|{platform.machine()}|{flags}".encode()).hexdigest()[:12]
    return f"ort{ort.__version__}-{platform.machine()}-{h}"


# every name prepared.prepare() writes into a store: what replacing a store (fsutil.atomic_dir(force=True)) may remove
STORE_FILES = r"prepared\.json|moe\d+\.(onnx|data)|\.moe\d+\.src\.onnx(\.data)?"


def store_dir(bundle_root: Path) -> Path:
    """$EMO_EDGE_HOME/prepared/<manifest sha256[:16]>/<cpu signature>: keyed by content (the manifest holds every
    expert's sha256), so copies of a bundle share one store and a changed bundle never reuses a stale one."""
    home = os.environ.get("EMO_EDGE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "emo-edge")
    from ...errors import BundleError
    from ...schema import read_bounded

    raw = read_bounded(Path(bundle_root) / "manifest.json", BundleError, "missing")
    key = hashlib.sha256(raw).hexdigest()[:16]
    return Path(home) / "prepared" / key / cpu_signature()


# ---------------------------------------------------------------------------------------------------------
# the union block graph
# ---------------------------------------------------------------------------------------------------------
def eligible(template, meta: dict) -> str | None:
    """None when the layer's block is router MatMul -> Softmax -> QMoE fed those softmax weights (what the mapped
    mechanism reproduces exactly), else why not."""
    ops = [n.op_type for n in template.graph.node]
    if sorted(ops) != ["MatMul", "QMoE", "Softmax"]:
        return f"block ops {ops}"
    q = next(n for n in template.graph.node if n.op_type == "QMoE")
    sm = next(n for n in template.graph.node if n.op_type == "Softmax")
    mm = next(n for n in template.graph.node if n.op_type == "MatMul")
    if len(q.input) < 15 or q.input[14] != sm.output[0] or q.input[1] != mm.output[0] or sm.input[0] != mm.output[0]:
        return "QMoE is not fed the router logits and their softmax"
    return None


def union_block(template, meta: dict, arrays: dict):
    """The layer's block over all union experts with pool-masked routing; `arrays`: initializer name -> array, or
    a TensorProto already pointing at external data."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = list(template.graph.node)
    mm = next(n for n in nodes if n.op_type == "MatMul")
    sm = next(n for n in nodes if n.op_type == "Softmax")
    q = next(n for n in nodes if n.op_type == "QMoE")
    pre = meta["router_weight"].rsplit("/", 1)[0] + "/emo_edge"
    lu = mm.output[0]
    new = [mm,
           helper.make_node("Gather", [lu, POOL_IDX], [pre + "/lp"], name=pre + "/Gather", axis=1),
           helper.make_node("Softmax", [pre + "/lp"], [pre + "/wp"], name=pre + "/Softmax",
                            axis=next((a.i for a in sm.attribute if a.name == "axis"), -1)),
           helper.make_node("Add", [lu, MASK], [pre + "/pu"], name=pre + "/Mask"),
           helper.make_node("Shape", [pre + "/lp"], [pre + "/shp"], name=pre + "/ShapeP"),
           helper.make_node("Unsqueeze", [POOL_IDX, pre + "/ax0"], [pre + "/pi"], name=pre + "/Unsqueeze"),
           helper.make_node("Expand", [pre + "/pi", pre + "/shp"], [pre + "/pix"], name=pre + "/Expand"),
           helper.make_node("Shape", [lu], [pre + "/shu"], name=pre + "/ShapeU"),
           helper.make_node("ConstantOfShape", [pre + "/shu"], [pre + "/zu"], name=pre + "/Zeros",
                            value=numpy_helper.from_array(np.zeros(1, np.float32))),
           helper.make_node("ScatterElements", [pre + "/zu", pre + "/pix", pre + "/wp"], [pre + "/wu"],
                            name=pre + "/Scatter", axis=1)]
    qi = list(q.input)
    qi[1], qi[14] = pre + "/pu", pre + "/wu"
    qn = helper.make_node("QMoE", qi, list(q.output), name=q.name, domain=q.domain)
    qn.attribute.extend(q.attribute)
    inits = [numpy_helper.from_array(np.array([0], np.int64), pre + "/ax0")]
    inits += [a if isinstance(a, TensorProto) else numpy_helper.from_array(np.ascontiguousarray(a), name)
              for name, a in arrays.items()]
    x_type = TensorProto.FLOAT
    g = helper.make_graph(new + [qn], f"emo_moe_union_{meta['layer']}",
                          [helper.make_tensor_value_info(meta["x"], x_type, None),
                           helper.make_tensor_value_info(POOL_IDX, TensorProto.INT64, None),
                           helper.make_tensor_value_info(MASK, TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info(meta["y"], x_type, None)], inits)
    m = helper.make_model(g, opset_imports=list(template.opset_import), producer_name="emo-edge mapped")
    m.ir_version = template.ir_version
    return m


# ---------------------------------------------------------------------------------------------------------
# the process's mappings of a prepared data file
# ---------------------------------------------------------------------------------------------------------
def file_mappings(path: Path) -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, perms) of every mapping of `path` in this process."""
    want = str(Path(path).resolve())
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip() == want:
                a, b = (int(x, 16) for x in parts[0].split("-"))
                out.append((a, b, int(parts[2], 16), parts[1]))
    return out


def anonymous_kb(path: Path) -> int:
    """Copy-on-write (anonymous) kB inside this process's mappings of `path`: must stay 0 for DONTNEED to be a
    pure eviction."""
    want = str(Path(path).resolve())
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if head and re.match(r"^[0-9a-f]+-[0-9a-f]+$", head[0]):
                inside = len(head) == 6 and head[5].strip() == want
            elif inside and line.startswith("Anonymous:"):
                total += int(line.split()[1])
    return total


@dataclass
class MappedLayer:
    """One layer's union session and where each expert's prepacked bytes are mapped."""
    session: object
    data_path: Path
    fd: int
    n: int
    fc1: dict
    fc2: dict
    sha: list
    maps: list = field(default_factory=list)
    resident: set = field(default_factory=set)  # union positions whose pages are loaded and verified
    stamp: tuple | None = None  # the data file's (inode, size, mtime, ctime) when `resident` was last verified

    def __post_init__(self) -> None:
        self.stamp = self._file_stamp()  # as opened: everything loaded later is verified against its sha256

    def _file_stamp(self) -> tuple:
        st = os.fstat(self.fd)
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def changed(self) -> bool:
        """Whether the data file was written since its resident experts were verified (any write moves ctime)."""
        return self._file_stamp() != self.stamp

    def reverify(self) -> list[int]:
        """The resident experts whose mapped bytes no longer hash to their sha256 (read from the pages the
        computation uses); the file's state is recorded as verified."""
        self.stamp = self._file_stamp()
        return [e for e in sorted(self.resident) if self.load(e) != self.sha[e]]

    def ranges(self, e: int) -> list[tuple[int, int]]:
        """File byte ranges [a, b) of expert e."""
        return [(r["offset"] + e * r["per_expert"], r["offset"] + (e + 1) * r["per_expert"]) for r in (self.fc1, self.fc2)]

    def expert_bytes(self, e: int = 0) -> int:
        return self.fc1["per_expert"] + self.fc2["per_expert"]

    def resident_bytes(self, e: int) -> int:
        """Pages expert e occupies (page-rounded, both matrices)."""
        return sum(((b + PAGE - 1) // PAGE - a // PAGE) * PAGE for a, b in self.ranges(e))

    def addr(self, off: int) -> int:
        for a, b, foff, _ in self.maps:
            if foff <= off < foff + (b - a):
                return a + off - foff
        raise BundleError(f"{self.data_path}: offset {off} is not mapped by onnxruntime (prepared store layout "
                          f"changed?)")

    def refresh_maps(self) -> None:
        self.maps = file_mappings(self.data_path)
        for r in (self.fc1, self.fc2):
            self.addr(r["offset"])
            self.addr(r["offset"] + r["length"] - 1)

    def drop_all(self) -> None:
        """Drop every page of the data file from this process and from the page cache."""
        for a, b, _, _ in self.maps:
            madvise(a, b - a, MADV_DONTNEED)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _page_span(self, e: int, a: int, b: int, exclusive: bool) -> tuple[int, int]:
        """Page-aligned file span of [a, b); with exclusive, leave out edge pages shared with a resident neighbour."""
        lo, hi = a // PAGE * PAGE, (b + PAGE - 1) // PAGE * PAGE
        if exclusive:
            if e > 0 and (e - 1) in self.resident and a % PAGE:
                lo += PAGE
            if e + 1 < self.n and (e + 1) in self.resident and b % PAGE:
                hi -= PAGE
        return lo, hi

    def evict(self, e: int, drop_cache: bool = True) -> None:
        """Unmap expert e's pages from this process (RSS drops at once) and, with drop_cache, from the page cache."""
        self.resident.discard(e)
        for a, b in self.ranges(e):
            lo, hi = self._page_span(e, a, b, exclusive=True)
            if hi > lo:
                madvise(self.addr(lo), hi - lo, MADV_DONTNEED)
        if drop_cache:
            self.drop_cache(e)

    def drop_cache(self, e: int) -> None:
        for a, b in self.ranges(e):
            lo, hi = self._page_span(e, a, b, exclusive=True)
            if hi > lo:
                os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)

    def prefetch(self, e: int) -> None:
        for a, b in self.ranges(e):
            os.posix_fadvise(self.fd, a, b - a, os.POSIX_FADV_WILLNEED)

    def load(self, e: int) -> str:
        """Populate expert e's pages in onnxruntime's mapping (read from disk at most once) and return the sha256
        of its bytes, hashed from those same pages."""
        h = hashlib.sha256()
        for a, b in self.ranges(e):
            lo, hi = self._page_span(e, a, b, exclusive=False)
            err = madvise(self.addr(lo), hi - lo, MADV_POPULATE_READ)
            if err:  # older kernels: touching reads the pages just the same
                buf = (ctypes.c_uint8 * (hi - lo)).from_address(self.addr(lo))
                np.frombuffer(buf, np.uint8)[::PAGE].sum()
            h.update((ctypes.c_char * (b - a)).from_address(self.addr(a)))
        return h.hexdigest()
