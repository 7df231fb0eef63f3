"""Mapped MoE layers: one onnxruntime session per layer over the UNION of the exported experts, built once, with
the experts' prepacked weights memory-mapped from a per-machine prepared store; a pool swap changes which experts'
pages are resident and the routing mask, and never rebuilds a session.

Why (measured, onnxruntime 1.32 CPU, emo-14b width, see bench/swap.py): rebuilding a pool's QMoE session costs
QMoE's prepack of every expert of the pool (~150 ms per 32-expert layer, single-threaded, ~700 MB/s), so the
rebuild design sat at ~5x the disk-read floor. onnxruntime can save prepacked constant initializers
("session.save_external_prepacked_constant_initializers") and, when it loads them back, uses the mmap'd bytes
directly (it re-derives them once at load to validate: "Serialized pre-packed weights ... do not match" on
a stale store). So:

  prepare (once per bundle, onnxruntime version and CPU; `$EMO_EDGE_HOME/prepared/<key>/`):
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
import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BundleError

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


# every name prepare() writes into a store: what replacing a store (fsutil.atomic_dir(force=True)) may remove
STORE_FILES = r"prepared\.json|moe\d+\.(onnx|data)|\.moe\d+\.src\.onnx(\.data)?"


def store_dir(bundle_root: Path) -> Path:
    """$EMO_EDGE_HOME/prepared/<manifest sha256[:16]>/<cpu signature>: keyed by content (the manifest holds every
    expert's sha256), so copies of a bundle share one store and a changed bundle never reuses a stale one."""
    home = os.environ.get("EMO_EDGE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "emo-edge")
    key = hashlib.sha256((Path(bundle_root) / "manifest.json").read_bytes()).hexdigest()[:16]
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
# the prepared store
# ---------------------------------------------------------------------------------------------------------
_PREPACKED = re.compile(r"^[^|]+\|(\d+);(\d+);\d+(\|.*)?$")


def _packed_region(t, n_experts: int) -> dict | None:
    """{offset, length, per_expert} of an initializer's first prepacked buffer in its external data file."""
    d = {e.key: e.value for e in t.external_data}
    pp = next((v for k, v in d.items() if k.startswith("prepacked")), None)
    if pp is None:
        return None
    m = _PREPACKED.match(pp)
    if not m:
        return None
    off, length = int(m.group(1)), int(m.group(2))
    if length % n_experts:
        return None
    return {"offset": off, "length": length, "per_expert": length // n_experts}


def _write_union_data(rt, L, path: Path) -> dict:
    """Stream layer L's expert records from its shard into `path` laid out per part ([n, ...] contiguous, as the
    union block's initializers), verifying each record's sha256; returns name -> external TensorProto."""
    from onnx import TensorProto, helper

    n, parts = len(L.ids), L.meta["parts"]
    bases, off = [], 0
    for p in parts:
        off = -(-off // PAGE) * PAGE
        bases.append(off)
        off += n * p["nbytes"]
    slot = np.empty(L.meta["record_stride"], np.uint8)  # the record, then its padding (must be zero)
    buf, pad = slot[:L.rec_bytes], slot[L.rec_bytes:]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, off)
        for e, meta in enumerate(L.meta["experts"]):
            got = os.preadv(L.fd, [slot.data], meta["offset"])
            if got != slot.nbytes:
                raise BundleError(f"{rt.root / L.meta['shard']}: expert {meta['source_id']} of layer {L.layer} is "
                                  f"truncated (read {got} of {slot.nbytes} bytes)")
            if hashlib.sha256(buf).hexdigest() != meta["sha256"]:
                raise BundleError(f"{rt.root / L.meta['shard']}: expert {meta['source_id']} of layer {L.layer} "
                                  f"fails its sha256 check (corrupted shard)")
            if pad.any():
                raise BundleError(f"{rt.root / L.meta['shard']}: the padding after expert {meta['source_id']} of "
                                  f"layer {L.layer} is not zero (corrupted shard)")
            a = 0
            for p, base in zip(parts, bases):
                os.pwrite(fd, buf[a:a + p["nbytes"]], base + e * p["nbytes"])
                a += p["nbytes"]
    finally:
        os.close(fd)
    protos = {}
    for p, base in zip(parts, bases):
        t = TensorProto()
        t.name = p["name"]
        t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(p["dtype"]))
        t.dims.extend([n, *p["shape"]])
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", path.name), ("offset", str(base)), ("length", str(n * p["nbytes"]))):
            ent = t.external_data.add()
            ent.key, ent.value = k, v
        protos[p["name"]] = t
    return protos


def prepare(rt, dest: Path, progress=None) -> dict:
    """Write the prepared store for runtime `rt` (a SwappableRuntime) into `dest` (an empty directory)."""
    import onnx
    import onnxruntime as ort

    layers = []
    for L in rt.layers:
        t0 = time.perf_counter()
        src = dest / f".moe{L.index}.src.onnx"
        arrays = {L.meta["router_weight"]: np.ascontiguousarray(L.router)}
        arrays.update(_write_union_data(rt, L, dest / (src.name + ".data")))  # one record in memory at a time
        model = union_block(L.template, L.meta, arrays)
        onnx.save(model, str(src))
        del model, arrays
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.optimized_model_filepath = str(dest / f"moe{L.index}.onnx")
        so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"moe{L.index}.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            sess = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types
            raise BundleError(f"layer {L.layer}: onnxruntime cannot prepare the union block "
                              f"({str(exc).splitlines()[0]})") from None
        del sess
        src.unlink()
        (dest / (src.name + ".data")).unlink()
        saved = onnx.load(str(dest / f"moe{L.index}.onnx"), load_external_data=False)
        n = len(L.ids)
        regions = {}
        for t in saved.graph.initializer:
            if t.name in (L.meta["parts"][0]["name"], L.meta["parts"][2]["name"] if len(L.meta["parts"]) > 2 else ""):
                r = _packed_region(t, n)
                if r is None:
                    raise BundleError(f"layer {L.layer}: onnxruntime saved no per-expert prepacked weights for "
                                      f"{t.name}")
                regions[t.name] = r
        if len(regions) != 2:
            raise BundleError(f"layer {L.layer}: expected prepacked fc1 and fc2 weights, found {sorted(regions)}")
        fc1, fc2 = (regions[L.meta["parts"][0]["name"]], regions[L.meta["parts"][2]["name"]])
        data = dest / f"moe{L.index}.data"
        shas = []
        with open(data, "rb") as f:
            for e in range(n):
                h = hashlib.sha256()
                for r in (fc1, fc2):
                    f.seek(r["offset"] + e * r["per_expert"])
                    h.update(f.read(r["per_expert"]))
                shas.append(h.hexdigest())
        layers.append({"index": L.index, "layer": L.layer, "model": f"moe{L.index}.onnx", "data": data.name,
                       "fc1": fc1, "fc2": fc2, "sha256": shas,
                       "fixed_sha256": fixed_sha256(dest / f"moe{L.index}.onnx", data, _expert_names(L.meta))})
        if progress:
            progress(f"prepared layer {L.layer}: {n} experts in {time.perf_counter() - t0:.1f} s")
    info = {"version": PREPARED_VERSION, "signature": cpu_signature(), "layers": layers}
    (dest / "prepared.json").write_text(json.dumps(info, indent=1))
    return info


def _expert_names(meta: dict) -> set:
    return {p["name"] for p in meta["parts"]}


def fixed_sha256(model: Path, data: Path, experts: set) -> str:
    """sha256 of what a layer's union session uses besides the experts: the graph file and every byte range of
    its data file that a non-expert initializer (the router, constants) names, raw and prepacked. The experts'
    prepacked bytes are checked per expert at each load (MappedLayer.load) and onnxruntime validates them against
    the raw ones when the session is created; this covers the rest (a corrupted router otherwise changes the
    routing silently). Small: the router is [hidden, experts] float32."""
    import onnx

    raw = model.read_bytes()
    h = hashlib.sha256(raw)
    graph = onnx.ModelProto()
    graph.ParseFromString(raw)  # the graph only: no external data is loaded
    with open(data, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for t in graph.graph.initializer:
            if t.name in experts:
                continue
            ext = {e.key: e.value for e in t.external_data}
            spans = [(int(ext["offset"]), int(ext["length"]))] if "offset" in ext and "length" in ext else []
            for k, v in ext.items():
                if k.startswith("prepacked"):
                    spans += [(int(a), int(b)) for a, b, *_ in (seg.split(";") for seg in v.split("|")[1:])]
            for off, length in spans:
                f.seek(off)
                h.update(f.read(max(0, min(length, size - off))))  # out of range: short, so it mismatches
    return h.hexdigest()


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
