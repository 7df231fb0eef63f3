"""What a request asks of generation (Sampling), the sampler, the decode loop over a DecodeSession, and what a
generation reports (Completion)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..errors import BundleError


@dataclass(frozen=True)
class Sampling:
    """Greedy (temperature 0) or nucleus sampling of up to `max_tokens` new tokens."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # llama.cpp's: generate past EOS (benchmarks and load tests want fixed lengths)


@dataclass
class Completion:
    """What one generation produced. `stop` says why it ended: "eos" (the EOS token, not in `ids`), "length"
    (`max_tokens`), "context" (the sequence filled the engine's token limit) or "cancelled" (`on_token`)."""

    ids: list[int] = field(default_factory=list)
    stop: str = "length"
    pool: str | None = None
    reason: str = "requested"
    scores: dict = field(default_factory=dict)
    swap: dict | None = None  # SwapStats.to_dict() when this generation had to swap
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache (not prefilled)
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps (the first comes from the prefill's logits)
    decode_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 and self.decode_tokens else 0.0

    @property
    def total_tokens(self) -> int:
        return self.cached_tokens + self.prefill_tokens + len(self.ids)

    def timings(self) -> dict:
        """Token counts, seconds and tokens/s of the prefill and the decode, and why it stopped."""
        return {"prefill_tokens": self.prefill_tokens, "prefill_s": self.prefill_s,
                "prefill_tok_s": self.prefill_tok_s, "decode_tokens": self.decode_tokens,
                "decode_s": self.decode_s, "decode_tok_s": self.decode_tok_s, "stop": self.stop,
                "total_tokens": self.total_tokens}

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                "total_tokens": self.total_tokens, "ttft_s": self.prefill_s}


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token from a logits row: argmax at temperature 0, else from softmax(logits / T) restricted to the
    smallest set of most likely tokens whose mass reaches `top_p`."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # shifted before dividing: a tiny temperature (1e-320) sends the others to -inf, never the max to inf
        z = (z - z.max()) / temperature
        p = np.exp(z)
    p = np.where(np.isnan(p), 0.0, p)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def check_prompt(n_tokens: int, limit: int, what: str) -> None:
    """A prompt must be non-empty and fit the limit (`what` names it in the message)."""
    if n_tokens <= 0:
        raise BundleError("empty prompt: nothing to run")
    if n_tokens > limit:
        raise BundleError(f"the prompt is {n_tokens} tokens, longer than {what} ({limit} tokens); shorten it")


def run_generation(session, ids, sampling: Sampling, eos: int | None,
                   on_token: Callable[[int], object] | None = None) -> Completion:
    """Prefill `ids` in `session`, then sample up to `sampling.max_tokens`, feeding each token back. Stops at EOS
    (unless `ignore_eos`), at `max_tokens`, when the session is full ("context"), or when `on_token(token)`
    returns true ("cancelled")."""
    rng = np.random.default_rng(sampling.seed)
    t0 = time.perf_counter()
    logits = session.prefill(ids)
    t1 = time.perf_counter()
    eos = None if sampling.ignore_eos else eos
    limit = min(sampling.max_tokens, session.room)  # prompt + answer fit the session (the context)
    out: list[int] = []
    stop = None
    while len(out) < limit:
        nxt = sample(logits[-1], sampling.temperature, sampling.top_p, rng)
        if eos is not None and nxt == eos:
            stop = "eos"
            break
        out.append(nxt)
        if on_token and on_token(nxt):
            stop = "cancelled"
            break
        if len(out) < limit:
            logits = session.feed([nxt])
    if stop is None:
        stop = "length" if len(out) >= sampling.max_tokens else "context"
    t2 = time.perf_counter()
    return Completion(ids=out, stop=stop, prefill_tokens=len(ids), prefill_s=t1 - t0,
                      decode_tokens=max(len(out) - 1, 0), decode_s=t2 - t1)
