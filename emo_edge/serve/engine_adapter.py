"""The narrow engine interface the server needs, and its implementation over today's `SwappableRuntime`.

The scheduler's one worker thread is the only caller of every method here except `Engine.pools`,
`Engine.token_limit` and `Engine.encode` (pure, safe from any thread). When the device side gets its one engine
API (issue 11, first section), only `RuntimeEngine` changes: the scheduler and the HTTP layer see `Engine`.

```
 HTTP handler ──encode, validate──▶ Job ──queue──▶ worker: choose(ids) ─▶ use(pool) ─▶ generate(ids, ..., on_token)
```
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """What one request asks of the sampler."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # llama.cpp's: generate past EOS (load tests want fixed lengths)


@dataclass
class Generated:
    """What one generation produced: its token ids and why it stopped ("eos", "length", "context", "cancelled")."""

    ids: list[int] = field(default_factory=list)
    stop: str = "length"
    decode_s: float = 0.0


class Engine(Protocol):
    """What the scheduler and the HTTP layer use of a model."""

    name: str
    pools: list[str]
    token_limit: int  # tokens one sequence may hold: prompt + answer
    tokenizer: object  # emo_edge.tokenizer.TextTokenizer (for TextStream)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def choose(self, ids: Sequence[int]) -> str:
        """The catalog pool for a prompt (deterministic: the same ids give the same pool)."""

    def resident_pool(self) -> str | None: ...

    def use(self, pool: str) -> float:
        """Make `pool` resident; returns the swap's milliseconds (0.0 when it already was)."""

    def generate(self, ids: Sequence[int], pool: str, sampling: Sampling,
                 on_token: Callable[[int], bool]) -> Generated:
        """Tokens after `ids` under the resident `pool`; stops when on_token returns True."""

    def stats(self) -> dict:
        """resident_experts, rss, peak_rss, budget (bytes or None)."""

    def close(self) -> None: ...


class RuntimeEngine:
    """`Engine` over `emo_edge.runtime.SwappableRuntime` (a swappable bundle under a memory budget)."""

    def __init__(self, bundle, budget=None, threads: int | None = None, max_tokens: int = 512,
                 progress: Callable[[str], None] | None = None):
        from pathlib import Path

        from ..runtime import SwappableRuntime

        self.rt = SwappableRuntime(bundle, budget=budget, threads=threads, max_tokens=max_tokens, progress=progress)
        self.name = Path(bundle).resolve().name
        self.pools = list(self.rt.pools)
        self.token_limit = self.rt.token_limit
        self.tokenizer = self.rt.tokenizer
        self.eos = self.rt.eos
        union = [tuple(L.ids) for L in self.rt.layers]  # every exported expert resident
        self.memory = {"budget": self.rt.budget, "backbone_rss": self.rt.backbone_rss,
                       "required_one_pool": self.rt.required_bytes()["total"],
                       "required_all_pools": self.rt.required_bytes(union)["total"]}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def choose(self, ids: Sequence[int]) -> str:
        name, _, _ = self.rt.choose_pool(list(ids), "auto")
        return name

    def resident_pool(self) -> str | None:
        return self.rt.active_name

    def use(self, pool: str) -> float:
        st = self.rt.use(pool)
        return 0.0 if st.noop else st.seconds * 1e3

    def generate(self, ids, pool, sampling: Sampling, on_token) -> Generated:
        t0 = time.perf_counter()
        res = self.rt.generate(list(ids), pool=pool, max_new_tokens=sampling.max_tokens,
                               temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                               stop_at_eos=not sampling.ignore_eos, on_token=on_token)
        if res["swap"] is not None and not res["swap"]["noop"]:  # the scheduler swaps first; never expected
            log.warning("generation under '%s' swapped inside the runtime", pool)
        return Generated(list(res["ids"]), res["stop"], res.get("decode_s", time.perf_counter() - t0))

    def stats(self) -> dict:
        r = self.rt.resident()
        return {"resident_experts": r["active_experts"] + r["cached_experts"], "active_experts": r["active_experts"],
                "rss": r["rss"], "peak_rss": r["peak_rss"], "budget": r["budget"]}

    def close(self) -> None:
        self.rt.close()
