"""The runtime's memory budget: what one resident pool costs, whether it fits, and the headroom left."""

from __future__ import annotations

from ...errors import BudgetError
from ..memory import MB, _mb, rss_now as rss


class Budget:
    """SwappableEngine's budget accounting (projected from the bundle and measured RSS).

    Uses the runtime's dims, budget, backbone_rss, layers, pools, mechanism, prepack_factor."""

    # ---- budget --------------------------------------------------------------------------------------------
    def pool_bytes(self, layers: list[tuple[int, ...]]) -> int:
        return sum(len(ids) * L.rec_bytes for ids, L in zip(layers, self.layers))

    def kv_bytes(self) -> int:
        """One decode session's KV cache of `max_tokens` positions: one buffer when past and present share it,
        else past + present during a step."""
        copies = 1 if getattr(self, "kv_shared", False) else 2
        return copies * self.session_kv_bytes(self.max_tokens)

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

    def _reserve_for_requests(self) -> int:
        """Memory kept free for requests and the next swap's transient."""
        req = self.required_bytes()
        return req["kv_cache"] + req["activations"] + req["swap_transient"]
