"""Running the bundle: one forward pass through the backbone segments and the active pool's MoE blocks, the
shared lock held per request, logits and generation (the decode loop is bundle.decode_loop)."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from ..bundle import decoder_feed
from ..errors import BundleError, PoolError
from .layers import MANIFEST
from .mapped import MASK, POOL_IDX


class Generation:
    """SwappableRuntime's forward pass, logits and generation.

    Uses the runtime's segments, layers, dims, lock, resolve(), use() and choose_pool()."""

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


def _run(sess, outs: list, feed: dict, what: str) -> list:
    """sess.run; onnxruntime's refusal of what a (crafted) bundle's graphs compute is one line naming the graph."""
    try:
        return sess.run(outs, feed)
    except Exception as exc:  # onnxruntime raises its own types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"{what}: onnxruntime failed running it ({msg})") from None
