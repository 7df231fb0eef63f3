"""The engine API every device-side caller uses (`run`, `chat`, `logits`, `serve`, the benches), and what the
two implementations share. A subclass supplies the graphs (`_bind`), what is resident (`serving`, `use`) and
how a pool is chosen (`choose_pool`); generation, logits and the tokenizer live here once."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import BundleError
from .sampler import Completion, Sampling, check_prompt, run_generation
from .session import DecodeSession, KVCache, Stages

MANIFEST = "manifest.json"


class Engine:
    """A bundle opened for running. Attributes every engine has:

    root, manifest, name (the bundle directory's name), pools (names a request may ask for), kind ("static" or
    "swappable"), n_layers, kv_heads, head_dim, kv_dtype, kv_shared (past/present share one buffer: the graphs'
    attention is GroupQueryAttention), vocab_size, context, eos, token_limit (tokens one
    sequence may hold: the context, or a smaller KV reserve), prefill_chunk, memory (what `serve` reports at
    start: budget, backbone_rss, required_one_pool, required_all_pools)."""

    kind = "engine"
    # tokens per prefill run: `python bench/variants.py --variant c256=B:prefill_chunk=256 ...` on the 16-layer
    # int4 bundle at prompt 1024: 128 / 256 / 512 / 1024 prefill 114.6 / 115.0 / 110.3 / 104.5 tok/s; the
    # planner's overhead term (targets/cpu.json overhead.prefill_tokens) assumes chunks of at most this
    prefill_chunk = 256

    # ---- what a subclass provides ------------------------------------------------------------------------
    def _bind(self, kv: KVCache) -> Stages:
        """The decoder's graphs bound to `kv`, as one callable over an environment of inputs."""
        raise NotImplementedError

    def serving(self, pool=None) -> contextlib.AbstractContextManager:
        """Hold `pool` resident for the block (None: whatever is resident); yields (pool name, SwapStats dict or
        None when nothing had to be swapped). Sessions are used inside it."""
        raise NotImplementedError

    def use(self, pool):
        """Make `pool` resident (a SwapStats; `.noop` when it already was)."""
        raise NotImplementedError

    def choose_pool(self, ids: Sequence[int], mode: str = "auto") -> tuple[object, str, dict]:
        """(pool, why, scores) for a prompt: deterministic, the same ids give the same pool."""
        raise NotImplementedError

    def resident_pool(self) -> str | None:
        raise NotImplementedError

    def stats(self) -> dict:
        """resident_experts, active_experts, rss, peak_rss, budget (bytes or None)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # ---- shared ----------------------------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        if getattr(self, "_tok", None) is None:
            from ..model.tokenizer import TextTokenizer

            path = self.root / "tokenizer.json"
            if self.manifest:
                from ..bundle.schema import bundle_file
                path = bundle_file(self.root, self.manifest, "tokenizer.json", f"{self.root / MANIFEST}: the tokenizer")
            self._tok = TextTokenizer(path)
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def choose(self, ids: Sequence[int]) -> str:
        """The catalog pool for a prompt."""
        return self.choose_pool(list(ids), "auto")[0]

    @property
    def limit_text(self) -> str:
        return "the bundle's context" if self.token_limit == self.context else "the runtime's KV reserve (max_tokens)"

    def session(self, capacity: int | None = None) -> DecodeSession:
        """A decode session holding up to `capacity` tokens (default `token_limit`); use it inside `serving`."""
        cap = self.token_limit if capacity is None else min(capacity, self.token_limit)
        if cap <= 0:
            raise BundleError("a session must hold at least one token")
        return DecodeSession(self._bind, self.n_layers, self.kv_heads, self.head_dim, cap, self.vocab_size,
                             self.kv_dtype, self.prefill_chunk, self.kv_shared)

    def logits(self, ids: Sequence[int], pool=None) -> np.ndarray:
        """Logits (S, V) float32 of one sequence in one forward pass, under `pool` (swapped in if needed)."""
        if not len(ids):
            raise BundleError("no tokens to run")
        check_prompt(len(ids), self.token_limit, self.limit_text)
        with self.serving(pool):
            return self.session(len(ids)).feed(ids).copy()

    def generate(self, prompt: str | Sequence[int], pool=None, sampling: Sampling | None = None,
                 on_token: Callable[[int], object] | None = None, choose_on: Sequence[int] | None = None,
                 **kw) -> Completion:
        """Generate after `prompt` (text or ids) under `pool`: a name, "auto"/"doc" (chosen from `choose_on`,
        default the prompt), or None (what is resident). `sampling` or its fields as keywords (max_tokens,
        temperature, top_p, seed, ignore_eos). A prompt over `token_limit` is refused."""
        sampling = sampling or Sampling(**kw)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt(len(ids), self.token_limit, self.limit_text)
        reason, scores = "requested", {}
        if pool in ("auto", "doc"):
            pool, reason, scores = self.choose_pool(list(choose_on) if choose_on else ids, pool)
        cache = self.prefix_cache if isinstance(pool, str) or pool is None else None  # ad-hoc pools: never kept
        with self.serving(pool) as (name, swap):
            need = len(ids) + sampling.max_tokens
            s, reused = cache.take(name, ids, min(need, self.token_limit)) if cache else (None, 0)
            if s is None:  # a kept session holds the whole context (zero pages until written)
                s = self.session(None if cache else need)
            done = run_generation(s, ids[reused:], sampling, self.eos, on_token)
            if cache:
                cache.put(name, s, ids + done.ids)
        done.cached_tokens = reused
        done.pool = name if isinstance(pool, str) or pool is None else "ad-hoc"
        done.reason, done.scores, done.swap = reason, scores, swap
        return done

    prefix_cache = None  # a PrefixCache once `keep_prefixes` is called

    def session_kv_bytes(self, tokens: int) -> int:
        """Bytes of KV cache `tokens` positions take in a session (keys and values of every layer)."""
        return 2 * self.n_layers * self.kv_heads * self.head_dim * np.dtype(self.kv_dtype).itemsize * tokens

    def keep_prefixes(self, max_bytes: int, max_entries: int = 16):
        """Keep sessions after each generation (engine/prefix.py) within `max_bytes` of KV cache; a later prompt
        that starts with tokens one holds prefills only the rest. Returns the cache (its `stats()` for metrics)."""
        from .prefix import PrefixCache

        self.prefix_cache = PrefixCache(max_bytes, max_entries)
        return self.prefix_cache


@contextlib.contextmanager
def nothing_swapped(name: str) -> Iterator[tuple[str, None]]:
    yield name, None


def open_engine(path: str | Path, budget=None, threads: int | None = None, max_tokens: int | None = None,
                progress: Callable[[str], None] | None = None, **kw) -> Engine:
    """The engine for a bundle directory: SwappableEngine for a swappable bundle (`budget` applies), else
    StaticEngine. `max_tokens`: the KV reserve of one sequence (default: the bundle's context)."""
    from .swappable import SwappableEngine, is_swappable
    from .static import StaticEngine

    if is_swappable(path):
        return SwappableEngine(path, budget=budget, threads=threads, max_tokens=max_tokens, progress=progress, **kw)
    return StaticEngine(path, threads=threads, max_tokens=max_tokens, **kw)
