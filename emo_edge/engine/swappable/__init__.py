"""The swappable engine: a resident backbone plus a budgeted, swappable set of experts.

    eng = SwappableEngine("bundles/x-swappable", budget="2GB")   # or emo_edge.engine.open_engine(...)
    eng.use("code")                       # reads only experts not resident; evicts LRU experts outside the pool
    out = eng.generate("def f(x):", pool="auto", max_tokens=32)   # picks the catalog pool by router mass
    eng.logits([5, 17, 99], pool="math")  # equals the static bundle of `math` (bit for bit)

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
  * Threads: a readers-writer lock: `serving(pool)` (generate, logits) holds it shared for the whole request,
    `use` exclusively.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import BudgetError, BundleError, PoolError
from ...schema import open_regular
from . import mapped
from .budget import Budget
from .chooser import Chooser
from .layers import MANIFEST, MoELayer, SwapStats, _bundle_pool_error, _CorruptStore, _NoStore
from .mapped_swap import MappedSwap
from ..base import Engine
from ..memory import GLOBAL_THREADS, MB, _mb, _trim, peak_rss, rss
from ..session import kv_dtype, shares_kv
from .prepared import PreparedStore
from .rebuild import RebuildSwap
from .rwlock import RWLock
from .serving import Serving
from ..ort_session import cpu_session

__all__ = ["MoELayer", "SwapStats", "SwappableEngine", "is_swappable"]


class SwappableEngine(PreparedStore, MappedSwap, RebuildSwap, Budget, Chooser, Serving, Engine):
    """A swappable bundle under a memory budget. Thread-safe. Its parts, one module each: prepared.py (the
    mapped mechanism's store), mapped_swap.py and rebuild.py (the two swap mechanisms), budget.py, chooser.py
    (pool choice), serving.py (its graphs bound to a decode session, and residency); generation and logits are
    the engine's (base.py); this class opens the bundle, resolves pools and runs `use` under the lock."""

    kind = "swappable"

    PREPACK_FACTOR = 1.25  # QMoE prepacked copy / raw bytes, until measured

    def __init__(self, root: str | Path, budget: str | int | None = None, threads: int | None = None,
                 max_tokens: int | None = 512, prefill_chunk: int = 64, check_backbone: bool = True,
                 cache_experts: bool = True, mechanism: str | None = None, progress: Callable | None = None):
        import onnxruntime as ort

        from ...bundle.files import check_files, read_manifest
        from ...bundle.schema import check_swappable, read_model_dims
        from ...units import parse_size

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
        self.max_tokens = 512 if max_tokens is None else max_tokens
        self.token_limit = min(self.context, self.max_tokens)  # one sequence's KV reserve
        self.name = self.root.resolve().name
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
        self.segments = self._open_segments(cfg)  # the backbone: one session per segment, built once
        self.kv_dtype = kv_dtype([s for s, _, _ in self.segments], f"{self.root / MANIFEST}: the backbone segments")
        self.kv_shared = shares_kv(self.head_dim)
        _trim()
        self.layers: list[MoELayer] = self._open_layers()  # routers resident, experts on demand
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
        union = [tuple(L.ids) for L in self.layers]  # every exported expert resident
        self.memory = {"budget": self.budget, "backbone_rss": self.backbone_rss,
                       "required_one_pool": self.required_bytes()["total"],
                       "required_all_pools": self.required_bytes(union)["total"]}

    def _serving(self) -> str:
        """What keeps serving after a refused swap, for its message."""
        return f"still serving pool '{self.active_name}'" if self.active_name else "no pool loaded yet"

    def _open_segments(self, cfg: dict) -> list:
        """One session per backbone segment, checked against the manifest's dataflow and decoder dims."""
        from ...bundle.schema import MANIFEST as _M, check_dataflow, check_decoder_inputs

        sw = self.sw
        segments = []
        for seg in sw["segments"]:
            so = self._options()
            try:
                sess = cpu_session(str(self.root / seg["file"]), so)
            except Exception as exc:  # onnxruntime raises its own types
                raise BundleError(f"{self.root / seg['file']}: onnxruntime cannot load it "
                                  f"({str(exc).splitlines()[0]})") from None
            segments.append((sess, seg["inputs"], seg["outputs"]))
        where = f"{self.root / _M}: field 'swappable"
        check_dataflow(where, list(zip(sw["segments"], (x[0] for x in segments))), sw["moe"], self.n_layers)
        dims_at = f"{where}.model.decoder" if sw.get("model") else f"{self.root / 'genai_config.json'}: field 'model.decoder"
        check_decoder_inputs(dims_at, {i.name: i.shape for sess, _, _ in segments for i in sess.get_inputs()
                                       if i.name.startswith("past_key_values.")}, cfg)
        return segments

    def _open_layers(self) -> list[MoELayer]:
        """Per MoE layer: its router (resident), its template (checked) and its expert shard, opened."""
        import onnx

        from ...bundle.schema import MANIFEST as _M, check_template

        sw = self.sw
        where = f"{self.root / _M}: field 'swappable"
        routers = np.fromfile(self.root / sw["routers"], dtype=np.uint8)
        layers: list[MoELayer] = []
        for m in sw["moe"]:
            r = m["router"]
            n = int(np.prod(r["shape"])) * 4
            router = routers[r["offset"]:r["offset"] + n].view(np.float32).reshape(r["shape"]).copy()
            tmpl = onnx.load(str(self.root / m["template"]), load_external_data=False)
            check_template(f"{where}.moe[{m['index']}]", m, tmpl)
            ids = [e["source_id"] for e in m["experts"]]
            with open_regular(self.root / m["shard"], BundleError, "missing expert shard") as f:
                fd = os.dup(f.fileno())
            layers.append(MoELayer(m["index"], m["layer"], m, router, ids, {s: i for i, s in enumerate(ids)},
                                   tmpl, fd))
        del routers
        return layers

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

    # ---- pools ---------------------------------------------------------------------------------------------
    def resolve(self, pool) -> tuple[str, list[tuple[int, ...]]]:
        """A catalog name, a pool JSON file, or per-layer lists (full model numbering) -> per-MoE-layer ids."""
        if isinstance(pool, str):
            if pool in self.pools:
                layers, name = self.pools[pool], pool
            elif Path(pool).is_file():
                from ...pools.file import PoolFile  # the one pool-file schema (bounded)
                from ...schema import load_json, validate

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
        if self.mechanism == "mapped":
            self.check_store()  # resident experts changed on disk are evicted first, so the swap reloads them
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
        if self.prefix_cache is not None:  # kept sessions of other pools give their memory back before the swap
            self.prefix_cache.drop_other_pools(name)
        if self.mechanism == "mapped":
            return self._swap_mapped(st, t0, name, target)
        return self._swap_rebuild(st, t0, name, target)

    # ---- facts ---------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        r = self.resident()
        return {"resident_experts": r["active_experts"] + r["cached_experts"], "active_experts": r["active_experts"],
                "rss": r["rss"], "peak_rss": r["peak_rss"], "budget": r["budget"]}

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


def is_swappable(path: str | Path) -> bool:
    from ...schema import load_json

    try:
        m = load_json(Path(path) / MANIFEST, BundleError)
    except BundleError:  # the loader that runs next says what is wrong with it
        return False
    return isinstance(m, dict) and m.get("kind") == "swappable"
