"""The swappable engine's graphs and residency: the backbone segments bound to a session's KV cache with the
active pool's MoE block between them, and `serving(pool)`, which holds the shared lock with a pool resident."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from ...errors import BundleError, PoolError
from ..session import BoundGraph, KVCache, run_error
from .mapped import MASK, POOL_IDX


class Serving:
    """SwappableEngine's forward pass and residency.

    Uses the engine's segments, layers, sw, lock, active/active_name, resolve() and use()."""

    def _bind(self, kv: KVCache, probe: list | None = None, routed: bool = True):
        """The decoder over `kv`: each backbone segment bound to it, each MoE layer's block between them.
        probe: per MoE layer a list that receives the router logits (T, r_union) of each run; routed=False
        leaves the routed experts' blocks out (they add nothing), as the pool chooser's probe does."""
        graphs = [BoundGraph(sess, kv, ins, outs, self.sw["segments"][s]["file"])
                  for s, (sess, ins, outs) in enumerate(self.segments)]
        layers = self.layers

        def run(env: dict) -> None:
            for s, g in enumerate(graphs):
                g.run(env)
                if s >= len(layers):
                    continue
                L = layers[s]
                x = env[L.meta["x"]]
                if probe is not None:
                    probe[s].append(x.reshape(-1, x.shape[-1]) @ L.router)
                if not routed:
                    env[L.meta["y"]] = np.zeros_like(x)
                    continue
                if L.session is None or (L.mapped is not None and L.pool_idx is None):
                    raise BundleError("no pool is active: call use(pool) first")
                feed = {L.meta["x"]: x, POOL_IDX: L.pool_idx, MASK: L.mask} if L.mapped is not None \
                    else {L.meta["x"]: x}
                try:
                    env[L.meta["y"]] = L.session.run([L.meta["y"]], feed)[0]
                except Exception as exc:  # onnxruntime raises its own types
                    raise run_error(f"the MoE block of layer {L.layer}", exc) from None
        return run

    @contextlib.contextmanager
    def serving(self, pool=None) -> Iterator[tuple[str, dict | None]]:
        """Hold the shared lock with `pool` resident (None: whatever is), swapping to it first if needed; yields
        (the resident pool's name, the swap's stats or None)."""
        if self.mechanism == "mapped":
            was = self.check_store()
            pool = was if pool is None and was is not None else pool
        target = None if pool is None else self.resolve(pool)[1]
        swap = None
        while True:
            self._lock.acquire_read()
            if (self.active_name is not None) if target is None else (target == self.active):
                break
            self._lock.release_read()
            if target is None:
                raise PoolError("no pool is active: name one (use(pool) / --pool)")
            st = self.use(pool)
            if not st.noop:
                swap = st.to_dict()
        try:
            yield self.active_name, swap
        finally:
            self._lock.release_read()

    def check_store(self) -> str | None:
        """The prepared store is a file on disk that onnxruntime computes from: if any layer's file was written
        since its resident experts were verified, hash them again from the mapped pages; experts that fail are
        evicted (so the next use loads and verifies them from disk, which prepares the store again once, or
        refuses) and, if the active pool held one, no pool stays active. Returns that pool's name then, else
        None. Costs one fstat per layer when nothing changed."""
        if not any(L.mapped is not None and L.mapped.changed() for L in self.layers):
            return None
        with self._swap_mutex:
            self._lock.acquire_write()
            try:
                bad = []
                for m, L in enumerate(self.layers):
                    for e in L.mapped.reverify():
                        L.mapped.evict(e)
                        self.lru.pop((m, e), None)
                        bad.append((m, e))
                if not bad:
                    return None
                hit = any(self.layers[m].ids[e] in self.layers[m].active for m, e in bad)
                if self.progress:
                    m, e = bad[0]
                    self.progress(f"notice: the prepared store changed on disk while serving: {len(bad)} resident "
                                  f"expert(s) failed their sha256 check (first: expert {self.layers[m].ids[e]} of "
                                  f"layer {self.layers[m].layer}); they are loaded and verified again")
                if not hit:
                    return None
                was, self.active_name = self.active_name, None
                for X in self.layers:
                    X.pool_idx = X.mask = None
                    X.active = ()
                return was
            finally:
                self._lock.release_write()

    def resident_pool(self) -> str | None:
        return self.active_name
