"""What a task is scored through: the PyTorch reference of a checkpoint (optionally restricted to a pool) or a
bundle opened by the engine that `run` and `serve` use, so what is measured is what users get.

Both give the same two operations:
- `complete(prompts, rules, max_tokens)`: greedy completions, each stopped at the end-of-text token, at a blank
  line, at the first line's end for the `first_line` rule, or after `max_tokens` tokens;
- `loglik(pairs)`: the summed log-probability of each continuation's tokens after its context.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

DEFAULT_MAX_TOKENS = 160


def _stopped(text: str, rule: str | None) -> bool:
    if "\n\n" in text:
        return True
    return rule == "first_line" and "\n" in text.lstrip("\n")


def _cut(text: str) -> str:
    return text.split("\n\n", 1)[0]


def split_continuation(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the continuation's tokens as they are in the joint encoding when the
    context's tokens are a prefix of it, else encoded alone (the lm-evaluation-harness rule)."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tok.encode(continuation)


def _logprob_sum(logits: np.ndarray, start: int, cont: Sequence[int]) -> float:
    """Sum of log p(cont[i] | ...) where row start-1+i of `logits` predicts cont[i]."""
    rows = logits[start - 1:start - 1 + len(cont)].astype(np.float64)
    rows = rows - rows.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(rows).sum(axis=-1))
    return float(sum(rows[i, t] - logz[i] for i, t in enumerate(cont)))


class ReferenceScorer:
    """The checkpoint's PyTorch reference (float32), restricted to `pool` (per-layer expert lists) or not.
    Greedy completions run in batches of prompts of equal token length (exact: same positions, no padding)."""

    def __init__(self, view, pool=None, batch: int = 32):
        from ..model.reference import Reference
        from ..model.tokenizer import load_tokenizer

        self.ref = Reference(view, pool)
        self.tok = load_tokenizer(view.root)
        self.eos = view.spec.eos_token_id
        self.batch = batch

    def complete(self, prompts: Sequence[str], rules: Sequence[str | None],
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> list[str]:
        import torch

        enc = [self.tok.encode(p) for p in prompts]
        out = [""] * len(prompts)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, ids in enumerate(enc):
            groups[len(ids)].append(i)
        for idxs in groups.values():
            for a in range(0, len(idxs), self.batch):
                part = idxs[a:a + self.batch]
                ids = torch.tensor([enc[i] for i in part])
                cache: list = []
                logits = self.ref.forward(ids, cache)
                gen: list[list[int]] = [[] for _ in part]
                live = [True] * len(part)
                for _ in range(max_tokens):
                    nxt = torch.argmax(logits[:, -1], dim=-1).tolist()
                    for j, t in enumerate(nxt):
                        if not live[j]:
                            continue
                        if t == self.eos:
                            live[j] = False
                            continue
                        gen[j].append(t)
                        if _stopped(self.tok.decode(gen[j]), rules[part[j]]):
                            live[j] = False
                    if not any(live):
                        break
                    logits = self.ref.forward(torch.tensor(nxt)[:, None], cache)
                for j, i in enumerate(part):
                    out[i] = _cut(self.tok.decode(gen[j]))
        return out

    def loglik(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        import torch

        scores = []
        for context, cont in pairs:
            ctx, c = split_continuation(self.tok, context, cont)
            logits = self.ref.forward(torch.tensor([ctx + c]))[0].numpy()
            scores.append(_logprob_sum(logits, len(ctx), c))
        return scores


class EngineScorer:
    """A bundle through the device engine (`open_engine`), under `pool` (a swappable bundle's pool name, or None:
    what the bundle holds)."""

    def __init__(self, engine, pool: str | None = None):
        self.engine, self.pool = engine, pool

    def complete(self, prompts: Sequence[str], rules: Sequence[str | None],
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> list[str]:
        eng = self.engine
        out = []
        with eng.serving(self.pool):
            for prompt, rule in zip(prompts, rules):
                ids = eng.encode(prompt)
                s = eng.session(len(ids) + max_tokens)
                logits = s.prefill(ids)
                gen: list[int] = []
                for _ in range(max_tokens):
                    t = int(np.argmax(logits[-1]))
                    if t == eng.eos:
                        break
                    gen.append(t)
                    if _stopped(eng.decode(gen), rule) or len(gen) == max_tokens:
                        break
                    logits = s.feed([t], last_only=True)
                out.append(_cut(eng.decode(gen)))
        return out

    def loglik(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        eng = self.engine
        scores = []
        for context, cont in pairs:
            ctx, c = split_continuation(eng.tokenizer, context, cont)
            logits = eng.logits(ctx + c, self.pool)
            scores.append(_logprob_sum(logits, len(ctx), c))
        return scores
