"""Runtime for swappable bundles: a resident backbone plus a budgeted, swappable set of experts.

    rt = SwappableRuntime("bundles/x-swappable", budget="2GB")
    rt.use("code")                       # reads only experts not resident; evicts LRU experts outside the pool
    out = rt.generate("def f(x):", pool="auto", max_new_tokens=32)   # picks the catalog pool by router mass
    rt.logits([5, 17, 99], pool="math")  # equals the static bundle of `math` (bit for bit)

Two mechanisms, chosen by measurement (onnxruntime 1.32 CPU, emo-14b width, bench/swap.py):
  * QMoE weights bound as graph inputs (IOBinding/OrtValues) run the non-prepacked path: 6x slower per call and
    numerically different from the static bundle (max diff 6e-3), so experts must be initializers. The bundle is
    cut into backbone segments (one session each, built once, never rebuilt) and one MoE block per layer.
  * "mapped" (default for QMoE bundles; mapped.py): one session per MoE layer over the UNION of the experts,
    built once from a per-machine prepared store whose prepacked expert weights onnxruntime memory-maps. A swap
    evicts pages (madvise DONTNEED) of least-recently-used experts outside the new pool, loads the missing
    experts' pages (MADV_POPULATE_READ on onnxruntime's own mapping, prefetched with posix_fadvise WILLNEED)
    and checks each one's sha256 from those pages, then switches the layer's routing mask: nothing is rebuilt,
    nothing is copied. Swap ~1.8-2x the disk-read floor; logits equal the static bundle of the pool bit for bit.
  * "rebuild" (fp32 MoE bundles, or EMO_EDGE_SWAP=rebuild): per layer, a session holding only the active pool,
    rebuilt on a swap from in-memory arenas given to onnxruntime with `add_initializer`; expert bytes come from
    the bundle's shards (preadv, sha256 per record). Cost = reading + QMoE's prepack of the layer's pool
    (single-threaded, ~700 MB/s): ~5x the disk-read floor.
  * Either way a failing expert aborts the swap before anything is switched ("no request runs on a half-swapped
    pool"; the old pool keeps serving), and process RSS (VmRSS, mapped pages included) is projected against the
    budget before anything is loaded; evicted experts leave RSS at once.
  * Threads: a readers-writer lock: `generate`/`logits` hold it shared for the whole request, `use` exclusively.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import BudgetError, BundleError, EmoEdgeError, PoolError
from ..bundle import decoder_feed
from .mapped import MASK, POOL_IDX

MANIFEST = "manifest.json"
MB = 1 << 20


# ---------------------------------------------------------------------------------------------------------
# process memory
# ---------------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    return _status_kb("VmRSS")


def peak_rss() -> int:
    return _status_kb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_release_policy() -> None:
    """Make glibc return freed large blocks to the kernel (fixed mmap threshold, trim threshold)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD: fixed, so big buffers are always mmap'd and munmap'd
        libc.mallopt(-1, 1 * MB)  # M_TRIM_THRESHOLD
        _malloc_release_policy.trim = libc.malloc_trim
    except (OSError, AttributeError):
        _malloc_release_policy.trim = None


_malloc_release_policy()


def _global_thread_pool() -> bool:
    """One process-wide onnxruntime thread pool for all segment and MoE sessions (measured: per-session pools
    for 2M+1 sessions thrash: decode 5 tok/s vs 25 tok/s; MoE block rebuild 20 % faster). Must run before
    onnxruntime's environment exists, hence at import."""
    try:
        from onnxruntime.capi import _pybind_state as C
        n = int(os.environ.get("EMO_EDGE_THREADS", "0")) or min(os.cpu_count() or 1, 8)
        C.set_global_thread_pool_sizes(n, 1)
        return True
    except Exception:  # older onnxruntime: per-session pools
        return False


GLOBAL_THREADS = os.environ.get("EMO_EDGE_GLOBAL_THREADS") == "1" and _global_thread_pool()


def _trim() -> None:
    trim = getattr(_malloc_release_policy, "trim", None)
    if trim is not None:
        trim(0)


# ---------------------------------------------------------------------------------------------------------
# readers-writer lock (writer preference)
# ---------------------------------------------------------------------------------------------------------
class RWLock:
    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def acquire_read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()


# ---------------------------------------------------------------------------------------------------------
# bundle structures
# ---------------------------------------------------------------------------------------------------------
@dataclass
class MoELayer:
    index: int  # MoE block index m
    layer: int
    meta: dict
    router: np.ndarray  # float32 [H, r_union], resident
    ids: list[int]  # union source ids (ascending)
    pos: dict[int, int]  # source id -> union position
    template: object  # onnx.ModelProto without weights
    fd: int
    active: tuple[int, ...] = ()
    arena: list = field(default_factory=list)  # per part: [n, ...] arrays (the active pool, ascending)
    router_T: np.ndarray | None = None
    ortvalues: list = field(default_factory=list)
    session: object = None
    mapped: object = None  # mapped.MappedLayer in the mapped mechanism
    pool_idx: np.ndarray | None = None  # mapped: union positions of the active pool (ascending)
    mask: np.ndarray | None = None  # mapped: 0 on the active pool, -inf elsewhere

    @property
    def rec_bytes(self) -> int:
        return self.meta["record_bytes"]


@dataclass
class SwapStats:
    pool: str
    seconds: float = 0.0
    read_s: float = 0.0
    build_s: float = 0.0
    bytes_read: int = 0
    experts_read: int = 0
    experts_reused: int = 0
    experts_from_cache: int = 0
    layers_rebuilt: int = 0
    noop: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _NoStore(Exception):
    """No prepared store can be written here: the runtime falls back to the rebuild mechanism."""


class _StaleStore(Exception):
    """The prepared store does not fit this bundle, onnxruntime or CPU, or is corrupted: prepare it again."""


class _CorruptStore(BundleError):
    """An expert of the prepared store failed its sha256 check while serving."""


class _StaleStoreError(EmoEdgeError):
    """A defect of prepared.json found by the shared validators (turned into _StaleStore)."""


def _bundle_pool_error(name: str, known: Sequence[str]) -> PoolError:
    return PoolError(f"pool '{name}' is not in this swappable bundle (pools: {', '.join(known)}; or 'auto', "
                     f"'doc', a pool JSON file)")


class SwappableRuntime:
    """A swappable bundle under a memory budget. Thread-safe."""

    PREPACK_FACTOR = 1.25  # QMoE prepacked copy / raw bytes, until measured

    def __init__(self, root: str | Path, budget: str | int | None = None, threads: int | None = None,
                 max_tokens: int = 512, prefill_chunk: int = 64, check_backbone: bool = True,
                 cache_experts: bool = True, mechanism: str | None = None, progress: Callable | None = None):
        import onnx
        import onnxruntime as ort

        from ..bundle import check_files, read_manifest
        from ..bundle_schema import (MANIFEST as _M, check_dataflow, check_decoder_inputs, check_swappable,
                                     check_template, read_model_dims)
        from ..units import parse_size

        self.root = Path(root)
        self.manifest = read_manifest(self.root)  # validated: bundle_schema.Manifest
        sw = self.manifest.get("swappable")
        if self.manifest.get("kind") != "swappable" or not isinstance(sw, dict):
            raise BundleError(f"{self.root}: not a swappable bundle (export it with --swappable)")
        self.sw = sw
        # decoder dims: the manifest's copy (newer bundles) or genai_config.json (older ones)
        cfg = read_model_dims(self.root, self.manifest, need_filename=False)
        dec = cfg["decoder"]
        self.n_layers, self.kv_heads, self.head_dim = dec["num_hidden_layers"], dec["num_key_value_heads"], \
            dec["head_size"]
        self.vocab_size, self.context, self.eos = cfg["vocab_size"], cfg["context_length"], cfg.get("eos_token_id")
        # every path confined and listed in `files`, shard records tiling their shards
        check_swappable(self.root, self.manifest, self.n_layers)
        if check_backbone:  # the shards' sizes here; their bytes per record (sha256 + zero padding) when read
            check_files(self.root, self.manifest, skip={m["shard"] for m in sw["moe"]})
        self.budget = parse_size(budget, "--budget") if budget is not None else None
        self.budget_text = str(budget)
        self.threads = threads
        self.max_tokens = max_tokens
        self.prefill_chunk = prefill_chunk
        self.cache_experts = cache_experts
        self.identity = (self.manifest.get("source") or {}).get("identity")
        self._ort = ort
        self.progress = progress
        if self.budget is not None:
            need = rss() + (self.root / sw["backbone_data"]).stat().st_size
            if need > self.budget:
                raise BudgetError(f"--budget {budget} ({_mb(self.budget)}) is below the backbone alone "
                                  f"({_mb(need)} with the runtime)")
        # ---- backbone: one session per segment, built once ------------------------------------------------
        self.segments = []
        for seg in sw["segments"]:
            so = self._options()
            try:
                sess = ort.InferenceSession(str(self.root / seg["file"]), so, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own types
                raise BundleError(f"{self.root / seg['file']}: onnxruntime cannot load it "
                                  f"({str(exc).splitlines()[0]})") from None
            self.segments.append((sess, seg["inputs"], seg["outputs"]))
        where = f"{self.root / _M}: field 'swappable"
        check_dataflow(where, list(zip(sw["segments"], (x[0] for x in self.segments))), sw["moe"], self.n_layers)
        dims_at = f"{where}.model.decoder" if sw.get("model") else f"{self.root / 'genai_config.json'}: field 'model.decoder"
        check_decoder_inputs(dims_at, {i.name: i.shape for sess, _, _ in self.segments for i in sess.get_inputs()
                                       if i.name.startswith("past_key_values.")}, cfg)
        _trim()
        # ---- MoE layers: routers resident, experts on demand ------------------------------------------------
        routers = np.fromfile(self.root / sw["routers"], dtype=np.uint8)
        self.layers: list[MoELayer] = []
        for m in sw["moe"]:
            r = m["router"]
            n = int(np.prod(r["shape"])) * 4
            router = routers[r["offset"]:r["offset"] + n].view(np.float32).reshape(r["shape"]).copy()
            tmpl = onnx.load(str(self.root / m["template"]), load_external_data=False)
            check_template(f"{where}.moe[{m['index']}]", m, tmpl)
            ids = [e["source_id"] for e in m["experts"]]
            try:
                fd = os.open(self.root / m["shard"], os.O_RDONLY)
            except OSError as exc:
                raise BundleError(f"{self.root / m['shard']}: cannot open the expert shard ({exc.strerror})") from None
            self.layers.append(MoELayer(m["index"], m["layer"], m, router, ids, {s: i for i, s in enumerate(ids)},
                                        tmpl, fd))
        del routers
        self.pools: dict[str, list] = {name: layers for name, layers in sw["pools"].items()}
        self.active_name: str | None = None
        self.cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # (m, source id) -> record
        self._lock = RWLock()
        self._swap_mutex = threading.Lock()
        self._hash_pool = ThreadPoolExecutor(max_workers=1)
        self.hash_in_thread = os.environ.get("EMO_EDGE_HASH_THREAD") == "1"
        self.prepack_factor = self.PREPACK_FACTOR
        self.swaps: list[SwapStats] = []
        self._reprepared = False  # a store corrupted while serving is prepared again once per runtime
        self.startup_peak = 0
        self.lru: OrderedDict[tuple[int, int], bool] = OrderedDict()  # mapped: resident (m, union position)
        # loaders populate + sha256 one expert each; on 2 cores 2 measured best (3: -4 %, 4: -15 %)
        self._load_pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))
        self._drop_pool = ThreadPoolExecutor(max_workers=1)
        self.mechanism = self._choose_mechanism(mechanism or os.environ.get("EMO_EDGE_SWAP", "auto"))
        if self.mechanism == "mapped":
            try:
                self._open_mapped(progress)
            except _NoStore as exc:
                if (mechanism or os.environ.get("EMO_EDGE_SWAP", "auto")) == "mapped":
                    raise BundleError(str(exc)) from None
                if progress:
                    progress(f"{exc}; swapping by rebuilding sessions instead (slower swaps)")
                self.mechanism = "rebuild"
        self.backbone_rss = rss()
        self.startup_peak = max(self.startup_peak, peak_rss())
        self._check_budget_fits()

    def _serving(self) -> str:
        """What keeps serving after a refused swap, for its message."""
        return f"still serving pool '{self.active_name}'" if self.active_name else "no pool loaded yet"

    # ---- mechanism -----------------------------------------------------------------------------------------
    def _choose_mechanism(self, want: str) -> str:
        """'mapped' (union sessions over a prepared store, no rebuild on a swap) where every MoE block is a QMoE
        it reproduces exactly and the platform allows; 'rebuild' (per-pool sessions) otherwise (fp32 MoE)."""
        from . import mapped as mp

        if want not in ("auto", "mapped", "rebuild"):
            raise BundleError(f"swap mechanism '{want}': expected auto, mapped or rebuild")
        if want == "rebuild":
            return "rebuild"
        why = mp.supported() or next((f"layer {L.layer}: {r}" for L in self.layers
                                      if (r := mp.eligible(L.template, L.meta))), None)
        if why is None:
            return "mapped"
        if want == "mapped":
            raise BundleError(f"{self.root}: the mapped swap mechanism cannot serve this bundle ({why})")
        return "rebuild"

    def _open_mapped(self, progress=None, again: str | None = None) -> None:
        """Create every layer's union session from the prepared store (preparing it first if this machine has
        none, or again if it is stale or corrupted: `again` says why it is known to be), then drop every page
        that loading touched."""
        import shutil

        from ..fsutil import atomic_dir, dir_of
        from . import mapped as mp

        store = mp.store_dir(self.root)
        if again is not None:
            if progress:
                progress(f"prepared store {again}; preparing again")
            shutil.rmtree(store, ignore_errors=True)
        for attempt in (0, 1) if again is None else (1,):
            if not (store / "prepared.json").is_file():
                raw_layer = max(len(L.ids) * L.rec_bytes for L in self.layers)
                need = rss() + int(raw_layer * 2.3)
                if self.budget is not None and need > self.budget:
                    raise BudgetError(f"--budget {self.budget_text} ({_mb(self.budget)}): preparing this bundle for "
                                      f"this CPU (once, into {store}) needs about {_mb(need)}; run it once without "
                                      f"a budget or with a larger one")
                if progress:
                    progress(f"preparing the bundle for this CPU (once) into {store}")
                try:
                    ours = dir_of(mp.STORE_FILES)  # a store of ours is replaced; nothing else
                    with atomic_dir(store, force=True, replaces=ours, what="prepared store") as tmp:
                        mp.prepare(self, tmp, progress)
                except OSError as exc:  # unwritable or full cache directory
                    raise _NoStore(f"{store}: cannot write the prepared store ({exc.strerror or exc})") from None
                except BundleError:  # the bundle itself (a shard failing its checks): not the store's fault
                    raise
                except EmoEdgeError as exc:  # fsutil: the store's directory cannot be made or written (full, ...)
                    if isinstance(exc, BudgetError):
                        raise
                    raise _NoStore(f"{store}: cannot write the prepared store ({exc})") from None
            try:
                self._load_mapped(store, self._read_prepared(store))
                return
            except _StaleStore as exc:
                for L in self.layers:
                    self._close_mapped(L)
                if attempt:
                    raise BundleError(f"{store}: prepared store rejected again after re-preparing ({exc})") from None
                if progress:
                    progress(f"prepared store is stale or corrupted ({exc}); preparing again")
                shutil.rmtree(store, ignore_errors=True)

    def _read_prepared(self, store: Path) -> dict:
        """prepared.json, validated against this bundle: anything wrong with it (our own file) means the store
        must be prepared again (_StaleStore), never a traceback."""
        from ..bundle_schema import Prepared
        from ..schema import confined, load_json, validate
        from . import mapped as mp

        path = store / "prepared.json"
        try:
            info = load_json(path, _StaleStoreError)
            validate(info, Prepared, str(path), _StaleStoreError)
            if info["version"] != mp.PREPARED_VERSION or len(info["layers"]) != len(self.layers):
                raise _StaleStoreError("version or layer count differs")
            for L, rec in zip(self.layers, info["layers"]):
                where = f"{path}: layer {L.layer}"
                data = confined(store, rec["data"], where, _StaleStoreError)
                confined(store, rec["model"], where, _StaleStoreError)
                size = data.stat().st_size if data.is_file() else -1
                for r in (rec["fc1"], rec["fc2"]):
                    if r["length"] != r["per_expert"] * len(L.ids) or r["offset"] + r["length"] > size:
                        raise _StaleStoreError(f"{where}: prepacked region {r} does not fit {rec['data']} "
                                               f"({size} bytes)")
                try:
                    fixed = mp.fixed_sha256(store / rec["model"], data, mp._expert_names(L.meta))
                except Exception as exc:  # noqa: BLE001 - a damaged graph or data file of our own store
                    raise _StaleStoreError(f"{where}: {rec['model']} unreadable ({type(exc).__name__})") from None
                if fixed != rec["fixed_sha256"]:
                    raise _StaleStoreError(f"{where}: {rec['model']} or its router weights fail their sha256 check")
        except _StaleStoreError as exc:
            raise _StaleStore(str(exc)) from None
        return info

    def _load_mapped(self, store: Path, info: dict) -> None:
        from . import mapped as mp

        recs = info.get("layers") if isinstance(info, dict) else None
        if info.get("version") != mp.PREPARED_VERSION or not isinstance(recs, list) or len(recs) != len(self.layers):
            raise _StaleStore("version or layer count differs")
        for L, rec in zip(self.layers, recs):
            if rec.get("index") != L.index or len(rec.get("sha256", [])) != len(L.ids):
                raise _StaleStore(f"layer {L.layer} differs")
            data = store / rec["data"]
            if self.budget is not None:
                need = rss() + len(L.ids) * L.rec_bytes + rec["fc1"]["length"] + rec["fc2"]["length"]
                if need > self.budget:
                    raise BudgetError(f"--budget {self.budget_text} ({_mb(self.budget)}) is below what opening "
                                      f"layer {L.layer} takes ({_mb(need)}: onnxruntime validates the union's "
                                      f"prepacked experts once at load)")
            try:  # (VmHWM is never reset here: /usr/bin/time's peak must stay truthful)
                sess = self._ort.InferenceSession(str(store / rec["model"]), self._options(arena=False),
                                                  providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own types; the store is ours: prepare it again
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise _StaleStore(f"{store / rec['model']}: {msg}") from None
            self.startup_peak = max(self.startup_peak, peak_rss())
            ml = mp.MappedLayer(sess, data, os.open(data, os.O_RDONLY), len(L.ids), rec["fc1"], rec["fc2"],
                                rec["sha256"])
            L.mapped, L.session = ml, sess
            try:
                ml.refresh_maps()
            except BundleError as exc:
                raise _StaleStore(str(exc)) from None
            if mp.anonymous_kb(data):
                raise BundleError(f"{data}: onnxruntime modified its mapping of the prepared weights; use "
                                  f"EMO_EDGE_SWAP=rebuild")
            ml.drop_all()
            _trim()

    def _close_mapped(self, L: MoELayer) -> None:
        if L.mapped is not None:
            L.session = None
            try:
                os.close(L.mapped.fd)
            except OSError:
                pass
            L.mapped = None
            L.pool_idx = L.mask = None
            L.active = ()

    def _swap_mapped(self, st: SwapStats, t0: float, name: str, target: list[tuple[int, ...]]) -> SwapStats:
        """Load and verify the experts of `target` not resident, evicting least-recently-used experts outside it
        just in time for the budget, then switch the routing masks. Nothing is rebuilt."""
        want = {(m, L.pos[s]) for m, (L, ids) in enumerate(zip(self.layers, target)) for s in ids}
        act = {(m, L.pos[s]) for m, L in enumerate(self.layers) for s in L.active}
        load = sorted(k for k in want if k[1] not in self.layers[k[0]].mapped.resident)
        for k in want:
            if k[1] in self.layers[k[0]].mapped.resident:
                if k in act:
                    st.experts_reused += 1
                else:
                    st.experts_from_cache += 1
        size = {k: self.layers[k[0]].mapped.resident_bytes(k[1]) for k in set(load) | set(self.lru)}
        need = sum(size[k] for k in load)
        # room kept for requests: KV + activations, less what of them is already part of RSS (buffers earlier
        # requests left allocated); RSS = backbone + resident experts + that
        already = max(0, rss() - self.backbone_rss - sum(size[k] for k in self.lru))
        reserve = max(0, self.kv_bytes() + self.activation_bytes() - already)
        evictable = [k for k in self.lru if k not in want]  # least recently used first
        if self._headroom(reserve) + sum(size[k] for k in evictable) < need:
            raise BudgetError(f"swap to '{name}' needs {_mb(need)} for its experts but only "
                              f"{_mb(max(self._headroom(reserve), 0))} of the {_mb(self.budget)} budget is free, even "
                              f"after evicting every cached expert (RSS {_mb(rss())}); {self._serving()}")
        evicted: list = []
        queue_ = iter(evictable)

        def make_room(nbytes: int, inflight: int) -> None:
            """Evict (LRU first) until `nbytes` more fit beside the `inflight` bytes being loaded."""
            if self.budget is None:
                return
            while self._headroom(reserve) - inflight < nbytes:
                k = next(queue_, None)
                if k is None:
                    return
                self.layers[k[0]].mapped.evict(k[1], drop_cache=False)
                del self.lru[k]
                evicted.append(k)

        loaded, failed = self._load_experts(load, st, make_room, size)
        if evicted:  # their pages already left RSS; let the page cache go too, off the swap's critical path
            self._drop_pool.submit(self._drop_page_cache, list(evicted))
        if failed is not None:
            for m, e in loaded:
                self.layers[m].mapped.evict(e)
                self.lru.pop((m, e), None)
            back, again = [k for k in evicted if k in act], None
            if back:
                _, again = self._load_experts(back, SwapStats(pool=self.active_name or ""), None, size)
            m, e, where = failed
            L = self.layers[m]
            if again is not None:
                was, self.active_name = self.active_name, None
                for X in self.layers:
                    X.pool_idx = X.mask = None
                    X.active = ()
                raise _CorruptStore(f"{where}: expert {L.ids[e]} of layer {L.layer} fails its sha256 check and "
                                    f"the previous pool '{was}' could not be restored; no pool is active until the "
                                    f"next successful swap")
            raise _CorruptStore(f"{where}: expert {L.ids[e]} of layer {L.layer} fails its sha256 check (corrupted "
                                f"prepared store); swap refused, {self._serving()}")
        for m, (L, ids) in enumerate(zip(self.layers, target)):
            idx = np.array([L.pos[s] for s in ids], np.int64)
            mask = np.full(len(L.ids), -np.inf, np.float32)
            mask[idx] = 0.0
            L.pool_idx, L.mask, L.active = idx, mask, tuple(ids)
        for k in sorted(want):
            self.lru[k] = True
            self.lru.move_to_end(k)
        self.active_name = name
        st.seconds = time.perf_counter() - t0
        self.swaps.append(st)
        return st

    def _drop_page_cache(self, keys) -> None:
        for m, e in keys:
            ml = self.layers[m].mapped
            if ml is not None and e not in ml.resident:
                ml.drop_cache(e)

    # experts whose reads are queued ahead of the loaders. Queuing the whole swap measured best (populate of a
    # pool's 128 experts, 604 MB cold: 2.28 GB/s vs 1.70 with 32 queued, 0.60 with none; sequential 2.80);
    # queued pages sit in the page cache, not in RSS, and are the very pages mapped moments later
    PREFETCH_WINDOW = 4096

    def _load_experts(self, keys, st: SwapStats, make_room=None, size=None):
        """Load and verify experts (m, union position) in order: a prefetch thread keeps PREFETCH_WINDOW experts'
        reads queued (posix_fadvise WILLNEED) so the disk always has work, the loaders populate each expert's
        pages in onnxruntime's mapping and hash them, three experts in flight. Returns (loaded, failure) with failure = (m, e, file) of the
        first expert whose sha256 differs, or None."""
        loaded, failed = [], None
        if not keys:
            return loaded, failed
        t = time.perf_counter()
        window = threading.Semaphore(self.PREFETCH_WINDOW)
        stop = threading.Event()

        def prefetch():
            for m, e in keys:
                window.acquire()
                if stop.is_set():
                    return
                self.layers[m].mapped.prefetch(e)

        pf = threading.Thread(target=prefetch, daemon=True)
        pf.start()

        def job(m, e):
            try:
                return self.layers[m].mapped.load(e)
            finally:
                window.release()

        pending, inflight = [], 0
        it = iter(keys)

        def submit(k):
            nonlocal inflight
            b = size[k] if size else 0
            if make_room is not None:
                make_room(b, inflight)
            inflight += b
            pending.append((k, b, self._load_pool.submit(job, *k)))

        try:
            for k in it:
                submit(k)
                if len(pending) >= 3:
                    break
            while pending:
                (m, e), b, fut = pending.pop(0)
                ml = self.layers[m].mapped
                got = fut.result()
                inflight -= b
                ml.resident.add(e)
                loaded.append((m, e))
                if got != ml.sha[e]:
                    failed = (m, e, ml.data_path)
                    break
                st.experts_read += 1
                st.bytes_read += ml.expert_bytes(e)
                self.lru[(m, e)] = True
                nxt = next(it, None)
                if nxt is not None:
                    submit(nxt)
        finally:
            stop.set()
            for _ in range(len(keys) + 1):
                window.release()
            for (m, e), _, fut in pending:  # after a failure: let the loads in flight finish, then count them
                fut.result()
                self.layers[m].mapped.resident.add(e)
                loaded.append((m, e))
            pf.join()
        st.read_s += time.perf_counter() - t
        return loaded, failed

    # ---- sessions ------------------------------------------------------------------------------------------
    def _options(self, arena: bool = True):
        so = self._ort.SessionOptions()
        if GLOBAL_THREADS and not self.threads:
            so.use_per_session_threads = False
        else:
            if self.threads:
                so.intra_op_num_threads = self.threads
            # 2M+1 sessions run one after another: spinning pool threads would fight each other
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = arena
        return so

    # ---- budget --------------------------------------------------------------------------------------------
    def pool_bytes(self, layers: list[tuple[int, ...]]) -> int:
        return sum(len(ids) * L.rec_bytes for ids, L in zip(layers, self.layers))

    def kv_bytes(self) -> int:
        return 2 * self.n_layers * self.kv_heads * self.head_dim * 4 * self.max_tokens * 2  # past + present

    def activation_bytes(self) -> int:
        return 64 * MB + 3 * 4 * self.vocab_size * self.prefill_chunk

    def _largest_pool(self) -> list[tuple[int, ...]]:
        per_layer = [max((len(p[L.layer]) for p in self.pools.values() if p[L.layer] is not None), default=0)
                     for L in self.layers]
        return [tuple(range(n)) for n in per_layer]

    def required_bytes(self, pool_layers: list[tuple[int, ...]] | None = None) -> dict:
        """What one resident pool costs: backbone (measured) + KV + activations + pool raw + prepacked copy
        + the swap transient (two layers' new arenas, one layer's prepack)."""
        pl = pool_layers or self._largest_pool()
        if self.mechanism == "mapped":  # the pool's prepacked pages are all it holds; nothing is built on a swap
            pool = sum(len(ids) * max(L.mapped.resident_bytes(e) for e in range(L.mapped.n))
                       for ids, L in zip(pl, self.layers))
            req = {"backbone_rss": self.backbone_rss, "kv_cache": self.kv_bytes(),
                   "activations": self.activation_bytes(), "pool_raw": pool, "pool_prepacked": 0,
                   "swap_transient": 0}
            req["total"] = sum(req.values())
            req["startup_peak"] = self.startup_peak
            return req
        raw = self.pool_bytes(pl)
        layer_max = max((len(ids) * L.rec_bytes for ids, L in zip(pl, self.layers)), default=0)
        req = {"backbone_rss": self.backbone_rss, "kv_cache": self.kv_bytes(), "activations": self.activation_bytes(),
               "pool_raw": raw, "pool_prepacked": int(raw * self.prepack_factor),
               "swap_transient": int(layer_max * (2 + self.prepack_factor))}
        req["total"] = sum(req.values())
        return req

    def _check_budget_fits(self) -> None:
        if self.budget is None:
            return
        req = self.required_bytes()
        if req["total"] > self.budget:
            raise BudgetError(
                f"--budget {self.budget_text} ({_mb(self.budget)}) is below backbone + one pool: backbone {_mb(req['backbone_rss'])} "
                f"(measured RSS) + KV {_mb(req['kv_cache'])} + activations {_mb(req['activations'])} + largest pool "
                f"{_mb(req['pool_raw'])} raw + {_mb(req['pool_prepacked'])} prepacked + swap transient "
                f"{_mb(req['swap_transient'])} = {_mb(req['total'])}")

    def _headroom(self, reserve: int) -> int:
        return (self.budget - rss() - reserve) if self.budget is not None else 1 << 62

    def _cache_bytes(self) -> int:
        return sum(r.nbytes for r in self.cache.values())

    def _evict_cache(self, need: int, keep: set) -> None:
        """Drop least-recently-used cached experts (never ones in `keep`) until `need` bytes fit."""
        for key in list(self.cache):
            if self._headroom(0) >= need:
                return
            if key in keep:
                continue
            del self.cache[key]
            _trim()

    # ---- pools ---------------------------------------------------------------------------------------------
    def resolve(self, pool) -> tuple[str, list[tuple[int, ...]]]:
        """A catalog name, a pool JSON file, or per-layer lists (full model numbering) -> per-MoE-layer ids."""
        if isinstance(pool, str):
            if pool in self.pools:
                layers, name = self.pools[pool], pool
            elif Path(pool).is_file():
                from ..bundle_schema import PoolFile
                from ..schema import load_json, validate

                layers = validate(load_json(pool, PoolError), PoolFile, pool, PoolError).layers
                name = Path(pool).stem
            else:
                raise _bundle_pool_error(pool, list(self.pools))
        else:
            layers, name = list(pool), "ad-hoc"
        if len(layers) != self.n_layers:
            raise PoolError(f"pool '{name}' has {len(layers)} layers, the bundle has {self.n_layers}")
        out = []
        for L in self.layers:
            entry = layers[L.layer]
            implicit = set(self.manifest["experts"][L.layer].get("implicit_source_ids") or [])
            ids = L.ids if entry is None else sorted(set(int(e) for e in entry) - implicit)
            bad = [e for e in ids if e not in L.pos]
            if bad:
                raise PoolError(f"pool '{name}' layer {L.layer} uses expert {bad[0]}, which this swappable bundle "
                                f"does not hold (it holds {len(L.ids)} experts there)")
            if len(ids) < L.meta["routed_k"]:
                raise PoolError(f"pool '{name}' layer {L.layer} keeps {len(ids)} experts; each token needs "
                                f"{L.meta['routed_k']}")
            out.append(tuple(ids))
        return name, out

    @property
    def active(self) -> list[tuple[int, ...]]:
        return [L.active for L in self.layers]

    # ---- swapping ------------------------------------------------------------------------------------------
    def use(self, pool) -> SwapStats:
        """Make `pool` the active pool. Blocks until requests in flight finish; requests arriving meanwhile wait."""
        name, target = self.resolve(pool)
        with self._swap_mutex:
            self._lock.acquire_write()
            try:
                try:
                    return self._swap(name, target)
                except _CorruptStore as exc:
                    if self._reprepared:
                        raise
                    self._reprepare(str(exc))
                    return self._swap(name, target)
            finally:
                self._lock.release_write()

    def _reprepare(self, why: str) -> None:
        """An expert of the prepared store failed its sha256 check: prepare the store again (once per runtime)
        and reopen every layer from it. If that fails, the old sessions stay as they were and `why` is raised."""
        self._reprepared = True
        old = [(L.mapped, L.session, L.pool_idx, L.mask, L.active) for L in self.layers]
        for L in self.layers:
            L.mapped = L.session = L.pool_idx = L.mask = None
            L.active = ()
        try:
            self._open_mapped(self.progress, again=f"is corrupted ({why.split('; swap refused')[0]})")
        except (EmoEdgeError, _NoStore) as exc:
            for L, (ml, sess, idx, mask, act) in zip(self.layers, old):
                self._close_mapped(L)
                L.mapped, L.session, L.pool_idx, L.mask, L.active = ml, sess, idx, mask, act
            raise BundleError(f"{why} (preparing the store again failed: {exc})") from None
        for ml, *_ in old:
            try:
                os.close(ml.fd)
            except OSError:
                pass
        self.lru.clear()
        self.active_name = None

    def _swap_need(self, target, changed) -> int:
        """RSS growth of a swap: the pool's growth (raw + prepacked) plus the transient: two layers' new arenas
        (the one being built, the one the reader fills ahead) and one layer's prepacked copy."""
        grow = max(0, self.pool_bytes(target) - self.pool_bytes(self.active))
        layer_max = max((len(target[m]) * self.layers[m].rec_bytes for m in changed), default=0)
        return int(grow * (1 + self.prepack_factor) + layer_max * (2 + self.prepack_factor))

    def _swap(self, name: str, target: list[tuple[int, ...]]):
        st = SwapStats(pool=name)
        t0 = time.perf_counter()
        if target == self.active:
            for m, ids in enumerate(target):
                for s in ids:
                    if (m, s) in self.cache:
                        self.cache.move_to_end((m, s))
                    if (m, self.layers[m].pos[s]) in self.lru:
                        self.lru.move_to_end((m, self.layers[m].pos[s]))
            self.active_name = name
            st.noop = True
            self.swaps.append(st)
            return st
        if self.mechanism == "mapped":
            return self._swap_mapped(st, t0, name, target)
        changed = [m for m, (L, ids) in enumerate(zip(self.layers, target)) if ids != L.active]
        plan = []  # per changed layer: (m, ids, [(t, s, where)])
        for m in changed:
            L, ids = self.layers[m], target[m]
            act = set(L.active)
            rows = []
            for t, s in enumerate(ids):
                if s in act:
                    st.experts_reused += 1
                    rows.append((t, s, "arena"))
                elif (m, s) in self.cache:
                    st.experts_from_cache += 1
                    rows.append((t, s, "cache"))
                else:
                    st.experts_read += 1
                    st.bytes_read += L.rec_bytes
                    rows.append((t, s, "disk"))
            plan.append((m, ids, rows))
        keep = {(m, s) for m, ids in enumerate(target) for s in ids}
        need = self._swap_need(target, changed)
        self._evict_cache(need, keep)
        if self._headroom(0) < need:
            raise BudgetError(f"swap to '{name}' needs {_mb(need)} more memory but only "
                              f"{_mb(max(self._headroom(0), 0))} of the {_mb(self.budget)} budget is free "
                              f"(RSS {_mb(rss())}); {self._serving()}")
        # producer thread: fills the new arenas layer by layer (old-arena rows, cached records, preadv from the
        # shard straight into the arena rows), sha256 in a second thread; the main thread builds each layer's
        # session as soon as its arena is verified (reading layer m+1 overlaps building layer m)
        q: queue.Queue = queue.Queue(maxsize=1)  # the reader runs at most one layer ahead
        stop = threading.Event()
        reader = threading.Thread(target=self._produce, args=(plan, q, stop), daemon=True)
        undo = []  # (m, old ids) of layers switched so far
        t_read = time.perf_counter()
        reader.start()
        try:
            for _ in plan:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                m, ids, arena, read_done = item
                L = self.layers[m]
                undo.append((m, L.active))
                L.session, L.ortvalues = None, []  # frees the old prepacked copy
                self._park(m, L, set(ids))  # experts leaving the pool -> LRU cache while the budget allows
                L.arena, L.router_T = [], None
                _trim()
                tb = time.perf_counter()
                idx = np.array([L.pos[s] for s in ids], np.int64)
                router_T = np.ascontiguousarray(L.router[:, idx])
                before = rss()
                L.session, L.ortvalues = self._build_moe(L, router_T, arena)
                L.arena, L.router_T, L.active = arena, router_T, tuple(ids)
                del arena
                st.build_s += time.perf_counter() - tb
                st.read_s = max(st.read_s, read_done - t_read)
                st.layers_rebuilt += 1
                raw = sum(a.nbytes for a in L.arena)
                grown = rss() - before
                if raw > 32 * MB and grown > 0:  # the prepacked copy, measured on big layers
                    self.prepack_factor = min(3.0, max(0.5, grown / raw))
        except BaseException:
            stop.set()
            while reader.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            reader.join()
            self._rollback(undo)
            raise
        reader.join()
        self.active_name = name
        st.seconds = time.perf_counter() - t0
        self.swaps.append(st)
        return st

    def _produce(self, plan, q: queue.Queue, stop: threading.Event) -> None:
        try:
            for m, ids, rows in plan:
                if stop.is_set():
                    return
                L = self.layers[m]
                parts = L.meta["parts"]
                arena = [np.empty((len(ids),) + tuple(p["shape"]), np.dtype(p["dtype"])) for p in parts]
                old_pos = {s: t for t, s in enumerate(L.active)}
                checks = []
                for t, s, where in rows:
                    if where == "arena":
                        for a, old in zip(arena, L.arena):
                            a[t] = old[old_pos[s]]
                    elif where == "cache":
                        rec = self.cache.pop((m, s))
                        for a, src in zip(arena, self._record_parts(L, rec)):
                            a[t] = src
                        del rec
                    else:
                        if not checks:
                            self._shard_unchanged(L)
                        meta = L.meta["experts"][L.pos[s]]
                        bufs = [a[t].reshape(-1).view(np.uint8) for a in arena]
                        pad = np.empty(L.meta["record_stride"] - L.rec_bytes, np.uint8)
                        got = os.preadv(L.fd, bufs + [pad], meta["offset"]) - pad.nbytes
                        if pad.any():  # the padding after a record is not hashed: it must be zero
                            raise BundleError(f"{self.root / L.meta['shard']}: the padding after expert {s} of layer "
                                              f"{L.layer} is not zero (corrupted shard); swap refused, "
                                              f"{self._serving()}")
                        if got != L.rec_bytes:
                            raise BundleError(f"{self.root / L.meta['shard']}: expert {s} of layer {L.layer} is "
                                              f"truncated (read {got} of {L.rec_bytes} bytes); swap refused, "
                                              f"{self._serving()}")
                        if self.hash_in_thread:
                            checks.append((s, meta["sha256"], self._hash_pool.submit(_sha_rows, bufs)))
                        else:  # inline: the record is still in the CPU cache
                            checks.append((s, meta["sha256"], _Done(_sha_rows(bufs))))
                for s, want, fut in checks:
                    if fut.result() != want:
                        raise BundleError(f"{self.root / L.meta['shard']}: expert {s} of layer {L.layer} fails its "
                                          f"sha256 check (corrupted shard); swap refused, {self._serving()}")
                item = (m, ids, arena, time.perf_counter())
                del arena
                _put_unless_stopped(q, item, stop)
        except BaseException as exc:  # handed to the main thread
            _put_unless_stopped(q, exc, stop)

    def _shard_unchanged(self, L: MoELayer) -> None:
        """The shard file is still the one opened at load (not deleted or replaced while serving)."""
        path = self.root / L.meta["shard"]
        try:
            same = os.path.samestat(os.stat(path), os.fstat(L.fd))
        except OSError:
            same = False
        if not same:
            raise BundleError(f"{path}: the expert shard was deleted or replaced while serving; swap refused, "
                              f"{self._serving()} (reopen the bundle)")

    def _rollback(self, undo) -> None:
        """Put back the layers already switched: their old experts come from the LRU cache or are re-read
        (and re-verified) from the shards. If that fails too, no pool is active until the next use()."""
        try:
            for m, old_ids in reversed(undo):
                L = self.layers[m]
                L.session, L.ortvalues, L.arena, L.router_T = None, [], [], None
                L.active = ()
                _trim()
                rows = [(t, s, "cache" if (m, s) in self.cache else "disk") for t, s in enumerate(old_ids)]
                q: queue.Queue = queue.Queue(maxsize=1)
                self._produce([(m, tuple(old_ids), rows)], q, threading.Event())
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                _, ids, arena, _ = item
                idx = np.array([L.pos[s] for s in ids], np.int64)
                L.router_T = np.ascontiguousarray(L.router[:, idx])
                L.session, L.ortvalues = self._build_moe(L, L.router_T, arena)
                L.arena, L.active = arena, tuple(ids)
        except EmoEdgeError as exc:
            was = self.active_name
            self.active_name = None
            raise BundleError(f"the previous pool '{was}' could not be restored either ({exc}); no pool is "
                              f"active until the next successful swap") from None
        finally:
            _trim()

    def _park(self, m: int, L: MoELayer, staying: set) -> None:
        """Copy the experts leaving layer m's pool from its old arena into the LRU cache (while the budget
        allows); the old arena is freed by the caller."""
        if not self.cache_experts or not L.arena:
            return
        for t, s in enumerate(L.active):
            if s in staying or (m, s) in self.cache:
                continue
            if self._headroom(self._reserve_for_requests()) < L.rec_bytes:
                break
            rec = np.empty(L.rec_bytes, np.uint8)
            off = 0
            for p, old in zip(L.meta["parts"], L.arena):
                rec[off:off + p["nbytes"]] = old[t].reshape(-1).view(np.uint8)
                off += p["nbytes"]
            self.cache[(m, s)] = rec

    def _reserve_for_requests(self) -> int:
        """Memory kept free for requests and the next swap's transient."""
        req = self.required_bytes()
        return req["kv_cache"] + req["activations"] + req["swap_transient"]

    def _record_parts(self, L: MoELayer, rec: np.ndarray) -> list[np.ndarray]:
        parts, off = [], 0
        for p in L.meta["parts"]:
            parts.append(rec[off:off + p["nbytes"]].view(np.dtype(p["dtype"])).reshape(p["shape"]))
            off += p["nbytes"]
        return parts

    def _build_moe(self, L: MoELayer, router_T: np.ndarray, arena: list[np.ndarray]):
        ort = self._ort
        model = type(L.template)()
        model.CopyFrom(L.template)
        inits = {t.name: t for t in model.graph.initializer}
        arrays = {L.meta["router_weight"]: router_T}
        arrays.update({p["name"]: a for p, a in zip(L.meta["parts"], arena)})
        so = self._options(arena=False)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.root))
        values = []
        for name, a in arrays.items():
            t = inits[name]
            del t.dims[:]
            t.dims.extend(a.shape)
            for e in t.external_data:
                if e.key == "length":
                    e.value = str(min(a.nbytes, os.fstat(L.fd).st_size))
            v = ort.OrtValue.ortvalue_from_numpy(a)
            so.add_initializer(name, v)
            values.append(v)
        try:
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BundleError(f"layer {L.layer}: onnxruntime cannot build the MoE block "
                              f"({str(exc).splitlines()[0]})") from None
        return sess, values

    # ---- forward -------------------------------------------------------------------------------------------
    def empty_cache(self) -> list[np.ndarray]:
        z = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return [z] * (2 * self.n_layers)

    def _forward(self, ids, cache, probe: list | None = None):
        env = decoder_feed(ids, cache, self.context, self.vocab_size, self.n_layers)
        for s, (sess, ins, outs) in enumerate(self.segments):
            res = _run(sess, outs, {k: env[k] for k in ins}, self.sw["segments"][s]["file"])
            env.update(zip(outs, res))
            if s < len(self.layers):
                L = self.layers[s]
                if L.session is None or (L.mapped is not None and L.pool_idx is None):
                    raise BundleError("no pool is active: call use(pool) first")
                x = env[L.meta["x"]]
                if probe is not None:
                    probe.append(x.reshape(-1, x.shape[-1]) @ L.router)
                if L.mapped is not None:
                    feed = {L.meta["x"]: x, POOL_IDX: L.pool_idx, MASK: L.mask}
                else:
                    feed = {L.meta["x"]: x}
                env[L.meta["y"]] = _run(L.session, [L.meta["y"]], feed, f"the MoE block of layer {L.layer}")[0]
        logits = env["logits"][0]
        new_cache = []
        for i in range(self.n_layers):
            new_cache += [env[f"present.{i}.key"], env[f"present.{i}.value"]]
        return logits, new_cache

    def _acquire_pool(self, pool) -> None:
        """Hold the shared lock with `pool` active (None: whatever is active)."""
        name, target = (None, None) if pool is None else self.resolve(pool)
        while True:
            self._lock.acquire_read()
            if target is None and self.active_name is not None:
                return
            if target is not None and target == self.active:
                return
            self._lock.release_read()
            if target is None:
                raise PoolError("no pool is active: name one (use(pool) / --pool)")
            self.use(pool)

    def logits(self, ids: Sequence[int], pool=None) -> np.ndarray:
        """Logits (S, V) of one sequence in one forward pass, under `pool` (swapping to it if needed)."""
        if not len(ids):
            raise BundleError("no tokens to run")
        self._acquire_pool(pool)
        try:
            return self._forward(ids, self.empty_cache())[0].astype(np.float32)
        finally:
            self._lock.release_read()

    # ---- pool choice ---------------------------------------------------------------------------------------
    def router_mass(self, ids: Sequence[int], probe: str = "backbone") -> list[np.ndarray]:
        """Per MoE layer: router probabilities [T, r_union] over all exported experts for the prompt.

        probe "backbone" (the chooser's): the prompt runs through the resident backbone with the shared and
        always-active experts only (each routed-expert block's output left out), so the routers see the same
        hidden states whatever pool is resident or came before; needs no pool loaded and takes no lock (the
        backbone and the routers never change). probe "active": through the active pool (the old chooser,
        history-dependent; kept to measure the difference, bench/auto_pool.py)."""
        if probe not in ("backbone", "active"):
            raise PoolError(f"router probe '{probe}': expected backbone or active")
        zs: list[list[np.ndarray]] = [[] for _ in self.layers]
        cache = self.empty_cache()
        if probe == "active":
            self._acquire_pool(None)
        try:
            for a in range(0, len(ids), self.prefill_chunk):
                chunk = ids[a:a + self.prefill_chunk]
                cache = (self._probe_forward(chunk, cache, zs) if probe == "backbone"
                         else self._active_probe(chunk, cache, zs))
        finally:
            if probe == "active":
                self._lock.release_read()
        out = []
        for parts in zs:
            z = np.concatenate(parts).astype(np.float64)  # (T, r_union)
            p = np.exp(z - z.max(axis=1, keepdims=True))
            out.append(p / p.sum(axis=1, keepdims=True))
        return out

    def _active_probe(self, ids, cache, zs):
        probe: list = []
        _, cache = self._forward(ids, cache, probe)
        for m, z in enumerate(probe):
            zs[m].append(z)
        return cache

    def _probe_forward(self, ids, cache, zs) -> list[np.ndarray]:
        """One chunk through the backbone segments, routed experts left out; appends each MoE layer's router
        logits (T, r_union) to zs[m]. Returns the new KV cache."""
        env = decoder_feed(ids, cache, self.context, self.vocab_size, self.n_layers)
        for s, (sess, ins, outs) in enumerate(self.segments):
            env.update(zip(outs, sess.run(outs, {k: env[k] for k in ins})))
            if s < len(self.layers):
                L = self.layers[s]
                x = env[L.meta["x"]]
                zs[s].append(x.reshape(-1, x.shape[-1]) @ L.router)
                env[L.meta["y"]] = np.zeros_like(x)  # the routed experts' block adds nothing
        return [env[f"present.{i}.{kv}"] for i in range(self.n_layers) for kv in ("key", "value")]

    def choose_pool(self, ids: Sequence[int], mode: str = "auto", probe: str = "backbone") -> tuple[object, str, dict]:
        """mode 'auto': the catalog pool with the highest router-mass coverage of the prompt (mean over MoE
        layers of the mean over tokens of the probability mass its experts get); 'doc': per layer the top-N
        experts of the prompt's router mass (N = the largest catalog pool's size in that layer, what the budget
        was checked for). Routers are probed independently of the resident pool (`router_mass`), so the same
        prompt gets the same pool whatever came before. Returns (pool name or per-layer lists, reason, scores)."""
        from ..bundle import check_prompt

        check_prompt(len(ids), self.context, "the bundle's context")
        probs = self.router_mass(ids, probe)
        how = "routers probed with the backbone and shared experts, independent of the resident pool" \
            if probe == "backbone" else f"routers probed with pool '{self.active_name}'"
        if mode == "doc":
            layers: list = [None] * self.n_layers
            sizes = self._largest_pool()
            for L, p, size in zip(self.layers, probs, sizes):
                mass = p.sum(axis=0)
                top = np.argsort(-mass, kind="stable")[:max(len(size), L.meta["routed_k"])]
                layers[L.layer] = sorted(L.ids[i] for i in top)
            cov = float(np.mean([p[:, [L.pos[s] for s in layers[L.layer]]].sum(axis=1).mean()
                                 for L, p in zip(self.layers, probs)]))
            return layers, (f"ad-hoc per-layer top-N pool from the prompt ({[len(s) for s in sizes]} experts per "
                            f"layer), router-mass coverage {cov:.3f} ({how})"), {"doc": cov}
        scores = {}
        for name in self.pools:
            _, target = self.resolve(name)
            scores[name] = float(np.mean([p[:, [L.pos[s] for s in ids_]].sum(axis=1).mean()
                                          for L, p, ids_ in zip(self.layers, probs, target)]))
        best = max(scores, key=lambda k: scores[k])
        ranked = ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items(), key=lambda kv: -kv[1]))
        return best, f"highest router-mass coverage of the prompt over {len(ids)} tokens: {ranked} ({how})", scores

    # ---- generation ----------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if getattr(self, "_tok", None) is None:
            from ..bundle_schema import bundle_file
            from ..tokenizer import TextTokenizer
            self._tok = TextTokenizer(bundle_file(self.root, self.manifest, "tokenizer.json",
                                                  f"{self.root / MANIFEST}: the tokenizer"))
        return self._tok

    @property
    def token_limit(self) -> int:
        """Tokens one sequence may hold: the bundle's context, or the KV reserve (`max_tokens`) if smaller."""
        return min(self.context, self.max_tokens)

    def generate(self, prompt: str | Sequence[int], pool="auto", max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
                 on_token: Callable[[int], object] | None = None, choose_on: Sequence[int] | None = None) -> dict:
        """Generate after `prompt` under `pool` (auto/doc: chosen from `choose_on`, default the prompt). A prompt
        longer than `token_limit` is refused; generation stops at EOS (not returned), after `max_new_tokens`,
        when the sequence fills `token_limit` ("stop": "context"), or when `on_token` returns true."""
        from ..bundle import check_prompt, decode_loop

        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        limit = self.token_limit
        check_prompt(len(ids), limit, "the bundle's context" if limit == self.context else
                     "the runtime's KV reserve (max_tokens)")
        reason, scores, swap = "requested", {}, None
        if pool in ("auto", "doc"):
            pool, reason, scores = self.choose_pool(list(choose_on) if choose_on else ids, pool)
        name, target = self.resolve(pool) if pool is not None else (self.active_name, None)
        if target is not None and target != self.active:
            swap = self.use(pool)
        rng = np.random.default_rng(seed)
        self._acquire_pool(pool)
        try:
            used = self.active_name
            t0 = time.perf_counter()
            cache = self.empty_cache()
            for a in range(0, len(ids), self.prefill_chunk):
                logits, cache = self._forward(ids[a:a + self.prefill_chunk], cache)
            t_prefill = time.perf_counter() - t0
            t1 = time.perf_counter()
            out, stop = decode_loop(self._forward, logits, cache, max_new_tokens, temperature, top_p, rng,
                                    self.eos if stop_at_eos else None, on_token, room=limit - len(ids))
            t_decode = time.perf_counter() - t1
        finally:
            self._lock.release_read()
        n_dec = max(len(out) - 1, 0)
        return {"ids": out, "pool": used if isinstance(pool, str) or pool is None else "ad-hoc", "reason": reason,
                "scores": scores, "swap": swap.to_dict() if swap else None,
                "prefill_tokens": len(ids), "prefill_s": t_prefill,
                "decode_tokens": n_dec, "decode_s": t_decode,
                "decode_tok_s": n_dec / t_decode if t_decode > 0 and n_dec else 0.0,
                "stop": stop, "total_tokens": len(ids) + len(out)}

    # ---- facts ---------------------------------------------------------------------------------------------
    def resident(self) -> dict:
        if self.mechanism == "mapped":
            act = {(m, L.pos[s]) for m, L in enumerate(self.layers) for s in L.active}
            cached = [k for k in self.lru if k not in act]
            return {"mechanism": "mapped", "active_pool": self.active_name, "active_experts": len(act),
                    "active_bytes": sum(self.layers[m].mapped.resident_bytes(e) for m, e in act),
                    "cached_experts": len(cached),
                    "cached_bytes": sum(self.layers[m].mapped.resident_bytes(e) for m, e in cached),
                    "rss": rss(), "peak_rss": peak_rss(), "budget": self.budget}
        return {"mechanism": "rebuild", "active_pool": self.active_name, "active_experts": sum(len(a) for a in self.active),
                "active_bytes": self.pool_bytes(self.active), "cached_experts": len(self.cache),
                "cached_bytes": self._cache_bytes(), "rss": rss(), "peak_rss": peak_rss(), "budget": self.budget}

    def close(self) -> None:
        self._drop_pool.shutdown(wait=True)
        for L in self.layers:
            self._close_mapped(L)
            L.session, L.ortvalues, L.arena = None, [], []
            try:
                os.close(L.fd)
            except OSError:
                pass
        self.cache.clear()
        self._hash_pool.shutdown(wait=False)
        self._load_pool.shutdown(wait=False)
        self.lru.clear()
        _trim()


def _run(sess, outs: list, feed: dict, what: str) -> list:
    """sess.run; onnxruntime's refusal of what a (crafted) bundle's graphs compute is one line naming the graph."""
    try:
        return sess.run(outs, feed)
    except Exception as exc:  # onnxruntime raises its own types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"{what}: onnxruntime failed running it ({msg})") from None


def _put_unless_stopped(q: queue.Queue, item, stop: threading.Event) -> None:
    """Hand `item` to the consumer, giving up once `stop` is set (the consumer stopped reading)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return
        except queue.Full:
            pass


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def cancel(self):
        pass


def _sha_rows(bufs) -> str:
    h = hashlib.sha256()
    for b in bufs:
        h.update(b)
    return h.hexdigest()


def _mb(n: int | None) -> str:
    return "none" if n is None else f"{n / MB:.0f} MiB"


def is_swappable(path: str | Path) -> bool:
    from ..schema import load_json

    try:
        m = load_json(Path(path) / MANIFEST, BundleError)
    except BundleError:  # the loader that runs next says what is wrong with it
        return False
    return isinstance(m, dict) and m.get("kind") == "swappable"


def swappable_logits(bundle: str | Path, pool: str | None, ids: list[int], text: str | None = None,
                     budget: str | None = None) -> np.ndarray:
    """Hook for `emo-edge logits BUNDLE --pool P --ids ...` on a swappable bundle: the logits under pool P
    (catalog name or pool JSON file), equal to the static bundle of P."""
    rt = SwappableRuntime(bundle, budget=budget)
    try:
        if pool is None:
            raise PoolError(f"{bundle} is a swappable bundle: give --pool (one of {', '.join(rt.pools)}, or a pool "
                            f"JSON file)")
        if text is not None:
            ids = rt.tokenizer.encode(text)
        if not ids:
            raise BundleError("no tokens to run")
        return rt.logits(ids, pool=pool)
    finally:
        rt.close()
