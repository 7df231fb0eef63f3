"""A swap in the mapped mechanism: load and verify the missing experts' pages, evicting least-recently-used
experts outside the new pool just in time for the budget, then switch the routing masks. Nothing is rebuilt."""

from __future__ import annotations

import threading
import time

import numpy as np

from ...errors import BudgetError
from .layers import SwapStats, _CorruptStore
from ..memory import _mb, rss_now as rss


class MappedSwap:
    """SwappableEngine's swap for the mapped mechanism (the LRU of resident expert pages).

    Uses the runtime's layers, lru, budget and Budget's headroom, its loader pools; sets active_name, swaps."""

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
