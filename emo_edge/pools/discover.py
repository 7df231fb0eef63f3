"""Pool discovery: which routed experts a domain uses, from a handful of its documents.

All methods run the model *layer by layer* over all calibration documents at once (the hidden states of every
document advance through layer l before layer l+1 is loaded), in streaming mode: one layer's attention weights
are resident at a time and experts are fetched when some token selects them, so the 27 GB shape runs in a few
GB of RAM. The tokens of all documents are concatenated for the MoE step (the MoE is per token, so this is
exact), which fetches each expert at most once per layer.

Per MoE layer, each routed expert gets a score and the top N are kept (ties broken by expert id). Shared and
always-active experts are implicit: never scored, never counted in N, always kept.

- mass      : sum over calibration tokens of the expert's router probability in the full model (EMO's
              document-pool statistic; for 'shared' routing the routed softmax, for 'always_active' the softmax
              over all experts).
- layerwise : the same statistic, but layer l's is gathered with layers < l already restricted to their chosen
              pools (upstream `greedy_prune_layerwise.py`), in one sweep through the layers.
- easy-ep   : arXiv 2504.06792 (upstream `easy_ep_prune.py`): score_i = sum over tokens t routed to i of
              g_i,t * ||E_i(x_t)|| * (1 - cos(x_t, x_t + moe_out_t)), with x_t the MoE's (normed) input as
              upstream; one pass of the full model.

Statistics recorded per layer: `coverage` (share of the calibration router probability mass, over routed
experts, that the pool captures), `topk_hit` (share of the tokens' routed top-k choices that land in the pool),
and for easy-ep `score_coverage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import PoolError
from ..progress import Shares
from ..model.reference import Reference, pool_mask, rms_norm, route
from ..model.spec import LayerSpec

from .sizes import METHODS, pool_sizes  # noqa: F401  (re-exported: torch-free home)
STAT_DIGITS = 6




def select(layer: LayerSpec, scores: np.ndarray, n: int) -> list[int]:
    """The top-n routed experts by score (ties: lower expert id first), sorted by id."""
    order = sorted(layer.routed_experts, key=lambda e: (-float(scores[e]), e))
    return sorted(order[:n])


# ---- the layer sweep -------------------------------------------------------------------------------------
@dataclass
class DocState:
    h: torch.Tensor  # (1, T, H)
    cos: torch.Tensor
    sin: torch.Tensor


def start_states(ref: Reference, docs: Sequence[Sequence[int]]) -> list[DocState]:
    states = []
    for ids in docs:
        t = torch.tensor([list(ids)], dtype=torch.long)
        cos, sin = ref.rope(torch.arange(t.shape[1])[None])
        states.append(DocState(ref.embed(t), cos, sin))
    return states


def attention_step(layer, states: list[DocState]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Attention (+ residual) of one layer for every document; returns the concatenated post-attention
    residual h1 (1, N, H), the MoE input x = ffn_norm(h1) (1, N, H), and the documents' lengths."""
    eps = layer.spec.rms_norm_eps
    h1s = []
    for s in states:
        a, _ = layer.attention(rms_norm(s.h, layer.attn_norm, eps), s.cos, s.sin, None)
        h1s.append(s.h + a)
    h1 = torch.cat(h1s, dim=1)
    return h1, rms_norm(h1, layer.ffn_norm, eps), [s.h.shape[1] for s in states]


def advance(layer, states: list[DocState], mask: torch.Tensor | None, observer=None, want_norms=False) -> None:
    """Run one decoder layer (restricted to `mask`) over every document, in place. Exactly
    `DecoderLayer.forward`, with the MoE step batched over all documents' tokens."""
    if layer.layer.num_experts == 0:
        for s in states:
            s.h = layer.forward(s.h, s.cos, s.sin)[0]
        return
    h1, x, lengths = attention_step(layer, states)
    h = h1 + layer.moe(x, h1, mask, observer, want_norms)
    for s, part in zip(states, torch.split(h, lengths, dim=1)):
        s.h = part


class _Stats:
    def __init__(self, layer: LayerSpec):
        E = layer.num_experts
        self.layer = layer
        self.mass = np.zeros(E, dtype=np.float64)
        self.hits = np.zeros(E, dtype=np.float64)
        self.easy = np.zeros(E, dtype=np.float64)

    def add_routing(self, probs: torch.Tensor, selected: torch.Tensor) -> None:
        self.mass += probs.double().sum(0).numpy()
        self.hits += np.bincount(selected.reshape(-1).numpy(), minlength=self.layer.num_experts)

    def add_easy_ep(self, info) -> None:
        x, out = info.x.float(), info.out.float()
        s = (1.0 - torch.nn.functional.cosine_similarity(x, x + out, dim=-1)).clamp(min=0.0)
        for j, (tok, norms) in info.expert_out_norm.items():
            g = (info.weights * (info.selected == j)).sum(-1)[tok]
            self.easy[j] += float((g.double() * norms.double() * s[tok].double()).sum())

    def summary(self, kept: list[int], method: str) -> dict:
        routed = list(self.layer.routed_experts)
        r = lambda v: round(float(v), STAT_DIGITS)  # noqa: E731
        share = lambda a: r(a[kept].sum() / a[routed].sum()) if a[routed].sum() > 0 else 0.0  # noqa: E731
        out = {"routed": len(routed), "kept": len(kept), "coverage": share(self.mass), "topk_hit": share(self.hits)}
        if method == "easy-ep":
            out["score_coverage"] = share(self.easy)
        # each kept expert's share of the selection score: what the planner trims by (lowest first)
        score = self.easy if method == "easy-ep" else self.mass
        total = float(score[routed].sum()) or 1.0
        out["scores"] = {str(e): r(score[e] / total) for e in kept}
        return out


ProgressFactory = Callable[[int, str], object]  # (total, description) -> object with .update(n) and .close()


def discover(ref: Reference, docs: Sequence[Sequence[int]], method: str, sizes: Sequence[int | None],
             progress: ProgressFactory | None = None) -> tuple[list[list[int] | None], list[dict | None]]:
    """Discover a pool. Returns (per-layer routed expert ids or None, per-layer statistics or None)."""
    if method not in METHODS:
        raise PoolError(f"unknown discovery method '{method}' (choose from {', '.join(METHODS)})")
    spec = ref.spec
    if not docs:
        raise PoolError("no calibration documents")
    total = sum(len(d) for d in docs)
    # the bar counts calibration tokens (spread over the layer sweep), the number the user was told
    bar = progress(total, f"{method} discovery") if progress else None
    shares = Shares(total, spec.num_layers)
    states = start_states(ref, docs)
    pool: list[list[int] | None] = [None] * spec.num_layers
    stats: list[dict | None] = [None] * spec.num_layers
    with torch.no_grad():
        for i, lspec in enumerate(spec.layers):
            layer = ref.layer(i)
            if lspec.num_experts == 0:
                advance(layer, states, None)
            elif method == "layerwise":
                st = _Stats(lspec)
                h1, x, lengths = attention_step(layer, states)
                flat = x.reshape(-1, x.shape[-1])
                probs, sel, _ = route(lspec, flat @ layer.router.T, spec.norm_topk_prob, None)
                st.add_routing(probs, sel)
                pool[i] = select(lspec, st.mass, sizes[i])
                stats[i] = st.summary(pool[i], method)
                h = h1 + layer.moe(x, h1, pool_mask(lspec, pool[i]), None, False)
                for s, part in zip(states, torch.split(h, lengths, dim=1)):
                    s.h = part
            else:
                st = _Stats(lspec)

                def observe(info, st=st):
                    st.add_routing(info.probs, info.selected)
                    if method == "easy-ep":
                        st.add_easy_ep(info)

                advance(layer, states, None, observe, want_norms=method == "easy-ep")
                score = st.easy if method == "easy-ep" else st.mass
                pool[i] = select(lspec, score, sizes[i])
                stats[i] = st.summary(pool[i], method)
            del layer
            if bar is not None:
                bar.update(shares.next())
    if bar is not None:
        bar.close()
    return pool, stats


# ---- measurement -----------------------------------------------------------------------------------------
def doc_nll(ref: Reference, docs: Sequence[Sequence[int]], pools: Sequence[Sequence[Sequence[int] | None] | None],
            progress: ProgressFactory | None = None) -> list[tuple[float, int, float]]:
    """Per pool (None = the full model): (summed negative log-likelihood, predicted tokens, mean per-token
    KL(first pool's next-token distribution || this pool's)) over `docs`, in one sweep through the layers (each
    layer is loaded once for all pools)."""
    spec = ref.spec
    masks = [[pool_mask(layer, None if p is None else p[layer.index]) for layer in spec.layers] for p in pools]
    # the bar counts predicted tokens (over all pools), spread over the layer sweep and the heads
    predicted = sum(max(len(d) - 1, 0) for d in docs) * len(pools)
    bar = progress(predicted, f"perplexity ({len(pools)} models, predicted tokens)") if progress else None
    shares = Shares(predicted, spec.num_layers * len(pools) + len(docs) * len(pools))
    states = [start_states(ref, docs) for _ in pools]
    with torch.no_grad():
        for i in range(spec.num_layers):
            layer = ref.layer(i)
            for m, st in zip(masks, states):
                advance(layer, st, m[i])
                if bar is not None:
                    bar.update(shares.next())
            del layer
        F = torch.nn.functional
        results = [[0.0, 0, 0.0] for _ in pools]  # nll, tokens, KL(first pool || this pool)
        for d, ids in enumerate(docs):
            target = torch.tensor(list(ids[1:]), dtype=torch.long)
            first = None
            for m, st in enumerate(states):
                logp = torch.log_softmax(ref.head(st[d].h)[0, :-1], dim=-1)
                results[m][0] += float(F.nll_loss(logp, target, reduction="sum"))
                results[m][1] += len(ids) - 1
                if first is None:
                    first = logp
                else:
                    results[m][2] += float((first.exp() * (first - logp)).sum())
                if bar is not None:
                    bar.update(shares.next())
        results = [(r[0], r[1], r[2] / r[1] if r[1] else 0.0) for r in results]
    if bar is not None:
        bar.close()
    return results
