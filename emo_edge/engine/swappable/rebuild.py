"""A swap in the rebuild mechanism (fp32 MoE bundles, or EMO_EDGE_SWAP=rebuild): per layer, a session holding
only the active pool, rebuilt on a swap from in-memory arenas given to onnxruntime with `add_initializer`; expert
bytes come from the bundle's shards (preadv, sha256 per record) or the LRU cache of experts that left a pool."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time

import numpy as np

from ...errors import BudgetError, BundleError, EmoEdgeError
from .layers import MoELayer, SwapStats
from ..memory import MB, _mb, _trim, rss_now as rss
from ..ort_session import cpu_session


class RebuildSwap:
    """SwappableEngine's swap for the rebuild mechanism (and its LRU cache of expert records).

    Uses the runtime's layers, cache, budget and Budget's headroom, _options; sets active_name, swaps."""

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

    def _swap_need(self, target, changed) -> int:
        """RSS growth of a swap: the pool's growth (raw + prepacked) plus the transient: two layers' new arenas
        (the one being built, the one the reader fills ahead) and one layer's prepacked copy."""
        grow = max(0, self.pool_bytes(target) - self.pool_bytes(self.active))
        layer_max = max((len(target[m]) * self.layers[m].rec_bytes for m in changed), default=0)
        return int(grow * (1 + self.prepack_factor) + layer_max * (2 + self.prepack_factor))

    def _swap_rebuild(self, st: SwapStats, t0: float, name: str, target: list[tuple[int, ...]]) -> SwapStats:
        """Rebuild every layer whose pool changes: arenas filled from the old arenas, the LRU cache and the shards
        (verified), each layer's session built as soon as its arena is; a failure rolls the switched layers back."""
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
            sess = cpu_session(model.SerializeToString(), so)
        except Exception as exc:
            raise BundleError(f"layer {L.layer}: onnxruntime cannot build the MoE block "
                              f"({str(exc).splitlines()[0]})") from None
        return sess, values


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
