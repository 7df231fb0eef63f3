"""The reference EMO model in PyTorch: the exact forward every later stage is checked against.

Reads top to bottom: RMSNorm -> attention (GQA, RoPE, KV cache) -> MoE routing -> experts -> decoder layer ->
model. Computation is float32 whatever the checkpoint dtype. A *pool* restricts a MoE layer to a set of routed
experts: the others' router logits are dropped before the softmax, exactly as if their gate rows were removed.
Shared and always-active experts are implicit members of every pool.

Two residency modes:
- resident (default): weights are loaded on first use and kept (small models, tests, generation);
- streaming: a layer's weights are loaded when the layer runs and dropped after it, and experts are fetched
  one at a time only when some token selects them, so a 27 GB checkpoint runs in a few GB of RAM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import rope
from .checkpoint import CheckpointView
from ..errors import PoolError
from .names import TensorKey
from .spec import EmoSpec, LayerSpec

Pool = Sequence[Sequence[int] | None]  # per layer: routed expert ids in source numbering, or None = all


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
           biases: tuple | None = None) -> torch.Tensor:
    if biases is None:
        return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    bg, bu, bd = biases
    return (F.silu(x @ gate.T + bg) * (x @ up.T + bu)) @ down.T + bd


@dataclass
class RouteInfo:
    """What one MoE layer did for a batch of tokens; handed to observers (pool discovery)."""
    layer: int
    x: torch.Tensor  # (N, H) normed input to the MoE
    residual: torch.Tensor  # (N, H) the residual stream the MoE output is added to
    probs: torch.Tensor  # (N, E) the probabilities top-k chose from (pool-masked entries are 0)
    selected: torch.Tensor  # (N, k) expert ids (source numbering)
    weights: torch.Tensor  # (N, k) their weights
    out: torch.Tensor  # (N, H) the MoE output
    expert_out_norm: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # expert id -> (token indices, ||E_j(x_t)|| before weighting) when the observer asks for them


def route(layer: LayerSpec, logits: torch.Tensor, norm_topk: bool, allowed: torch.Tensor | None):
    """EMO routing for one MoE layer. logits: (N, E). `allowed`: bool (E,) pool mask (implicit experts True).
    Returns (probs (N, E), selected (N, k), weights (N, k))."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    k, n = layer.top_k, layer.num_experts
    if layer.routing == "always_active":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
        always = torch.tensor(layer.always_active, dtype=torch.long)
        masked = probs.clone()
        masked[:, always] = float("-inf")
        _, routed = torch.topk(masked, layer.routed_k, dim=-1)
        sel = torch.cat([always.expand(probs.shape[0], -1), routed], dim=-1)
        return probs, sel, probs.gather(-1, sel)
    if layer.routing == "shared":
        s = layer.num_shared
        p_routed = torch.softmax(logits[:, : n - s], dim=-1, dtype=torch.float32)
        p_shared = torch.softmax(logits[:, n - s:], dim=-1, dtype=torch.float32)
        w_r, i_r = torch.topk(p_routed, k - s, dim=-1)
        w_s, i_s = torch.topk(p_shared, s, dim=-1)
        probs = torch.cat([p_routed, p_shared], dim=-1)
        return probs, torch.cat([i_r, i_s + (n - s)], dim=-1), torch.cat([w_r, w_s], dim=-1)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, sel = torch.topk(probs, k, dim=-1)
    if norm_topk:
        w = w / w.sum(dim=-1, keepdim=True)
    return probs, sel, w


def pool_mask(layer: LayerSpec, experts: Sequence[int] | None) -> torch.Tensor | None:
    """Bool mask over the layer's experts for a pool (None = unrestricted); validates the pool."""
    if experts is None or layer.num_experts == 0:
        return None
    ids = set(int(e) for e in experts)
    bad = sorted(e for e in ids if not 0 <= e < layer.num_experts)
    if bad:
        raise PoolError(f"layer {layer.index}: pool expert {bad[0]} does not exist (layer has {layer.num_experts})")
    routed = ids - set(layer.implicit_experts)
    if len(routed) < layer.routed_k:
        raise PoolError(f"layer {layer.index}: pool keeps {len(routed)} routed experts but each token needs "
                        f"{layer.routed_k}")
    mask = torch.zeros(layer.num_experts, dtype=torch.bool)
    mask[sorted(routed | set(layer.implicit_experts))] = True
    return mask


class DecoderLayer:
    """One decoder layer's weights (attention resident, experts fetched on demand) and its forward."""

    def __init__(self, view: CheckpointView, index: int, keep_experts: bool):
        spec = view.spec
        self.view, self.spec, self.layer = view, spec, spec.layers[index]
        self.keep_experts = keep_experts
        t = lambda role: view.tensor(TensorKey(role, index))  # noqa: E731
        self.attn_norm, self.ffn_norm = t("attn_norm"), t("ffn_norm")
        self.q, self.k, self.v, self.o = t("q"), t("k"), t("v"), t("o")
        self.attn_bias = tuple(t(r) for r in ("q_bias", "k_bias", "v_bias", "o_bias")) if spec.attention_bias else None
        if self.layer.num_experts == 0:
            self.dense = (t("dense_gate"), t("dense_up"), t("dense_down"))
            self.dense_bias = tuple(t(r) for r in ("dense_gate_bias", "dense_up_bias", "dense_down_bias")) \
                if spec.dense_mlp_bias else None
        else:
            self.router = t("router")  # (E, H)
        self._experts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def expert(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self._experts.get(j)
        if w is None:
            i = self.layer.index
            w = tuple(self.view.tensor(TensorKey(r, i, j)) for r in ("expert_gate", "expert_up", "expert_down"))
            if self.keep_experts:
                self._experts[j] = w
        return w

    # ---- attention ----------------------------------------------------------------------------------
    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  past: tuple[torch.Tensor, torch.Tensor] | None):
        spec = self.spec
        B, T, _ = x.shape
        nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        bq, bk, bv, bo = self.attn_bias or (None,) * 4
        q = F.linear(x, self.q, bq).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = F.linear(x, self.k, bk).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = F.linear(x, self.v, bv).view(B, T, nkv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        rep = nh // nkv
        kr = k.repeat_interleave(rep, dim=1) if rep > 1 else k  # (B, nh, P+T, hd)
        vr = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        scores = (q @ kr.transpose(2, 3)) * (hd ** -0.5)  # (B, nh, T, P+T)
        P = kr.shape[2] - T
        causal = torch.ones(T, P + T, dtype=torch.bool).tril(diagonal=P)
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = torch.softmax(scores, dim=-1, dtype=torch.float32) @ vr  # (B, nh, T, hd)
        out = attn.transpose(1, 2).reshape(B, T, nh * hd)
        return F.linear(out, self.o, bo), present

    # ---- feed-forward -------------------------------------------------------------------------------
    def moe(self, x: torch.Tensor, residual: torch.Tensor, allowed: torch.Tensor | None,
            observer: Callable[[RouteInfo], None] | None, want_norms: bool) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        logits = x @ self.router.T  # (N, E)
        probs, sel, w = route(self.layer, logits, self.spec.norm_topk_prob, allowed)
        out = torch.zeros_like(x)
        norms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for j in torch.unique(sel).tolist():
            tok, slot = torch.where(sel == j)
            y = swiglu(x[tok], *self.expert(j))  # (n_j, H)
            if want_norms:
                norms[j] = (tok, y.norm(dim=-1))
            out.index_add_(0, tok, y * w[tok, slot, None])
        if observer is not None:
            observer(RouteInfo(self.layer.index, x, residual.reshape(-1, shape[-1]), probs, sel, w, out, norms))
        return out.view(shape)

    def forward(self, h: torch.Tensor, cos, sin, past=None, allowed=None, observer=None, want_norms=False):
        """h: (B, T, H) -> (B, T, H), present (k, v)."""
        a, present = self.attention(rms_norm(h, self.attn_norm, self.spec.rms_norm_eps), cos, sin, past)
        h = h + a
        x = rms_norm(h, self.ffn_norm, self.spec.rms_norm_eps)
        if self.layer.num_experts == 0:
            return h + swiglu(x, *self.dense, biases=self.dense_bias), present
        return h + self.moe(x, h, allowed, observer, want_norms), present


class Reference:
    """The full model. `pool` restricts every MoE layer (see module docstring)."""

    HEAD_CHUNK_ROWS = 16384  # lm_head rows per matmul when the head is too big to keep resident

    def __init__(self, view: CheckpointView, pool: Pool | None = None, streaming: bool = False):
        self.view, self.spec, self.streaming = view, view.spec, streaming
        self.set_pool(pool)
        self._layers: dict[int, DecoderLayer] = {}
        self._final_norm = view.tensor(TensorKey("final_norm"))
        head_key = TensorKey("embed" if self.spec.tie_word_embeddings else "lm_head")
        self._head_key = head_key
        head_bytes = self.spec.vocab_size * self.spec.hidden_size * 4
        self._head = view.tensor(head_key) if not streaming and head_bytes <= (512 << 20) else None

    def set_pool(self, pool: Pool | None) -> None:
        spec = self.spec
        if pool is not None and len(pool) != spec.num_layers:
            raise PoolError(f"pool has {len(pool)} layers, model has {spec.num_layers}")
        self.masks = [pool_mask(layer, None if pool is None else pool[layer.index]) for layer in spec.layers]

    def layer(self, i: int) -> DecoderLayer:
        layer = self._layers.get(i)
        if layer is None:
            layer = DecoderLayer(self.view, i, keep_experts=not self.streaming)
            if not self.streaming:
                self._layers[i] = layer
        return layer

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= self.spec.vocab_size else int(ids.min())
            raise PoolError(f"token id {bad} is outside the vocabulary [0, {self.spec.vocab_size})")
        flat = ids.reshape(-1).numpy()
        uniq, inverse = np.unique(flat, return_inverse=True)
        rows = self.view.tensor(TensorKey("embed"), rows=uniq)  # only the rows we need
        return rows[torch.from_numpy(inverse)].view(*ids.shape, -1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = rms_norm(h, self._final_norm, self.spec.rms_norm_eps)
        if self._head is not None:
            return h @ self._head.T
        V = self.spec.vocab_size
        parts = []
        for start in range(0, V, self.HEAD_CHUNK_ROWS):
            rows = np.arange(start, min(V, start + self.HEAD_CHUNK_ROWS))
            parts.append(h @ self.view.tensor(self._head_key, rows=rows).T)
        return torch.cat(parts, dim=-1)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope.cos_sin(self.spec, positions.numpy())
        return torch.from_numpy(cos)[:, None], torch.from_numpy(sin)[:, None]  # (B, 1, T, hd)

    @torch.no_grad()
    def forward(self, ids, cache: list | None = None, observer=None, want_norms=False) -> torch.Tensor:
        """ids: (B, T) token ids. `cache`: a list (one (k, v) per layer, or empty) extended in place.
        Returns float32 logits (B, T, vocab)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        B, T = ids.shape
        past_len = cache[0][0].shape[2] if cache else 0
        positions = torch.arange(past_len, past_len + T).expand(B, T)
        cos, sin = self.rope(positions)
        h = self.embed(ids)
        has_past = bool(cache)
        for i in range(self.spec.num_layers):
            past = cache[i] if has_past else None
            h, present = self.layer(i).forward(h, cos, sin, past, self.masks[i], observer, want_norms)
            if cache is not None:
                if len(cache) > i:
                    cache[i] = present
                else:
                    cache.append(present)
        return self.head(h)

    @torch.no_grad()
    def generate(self, ids: Sequence[int], max_new_tokens: int, eos: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """Greedy decoding with the KV cache. Returns the new token ids."""
        cache: list = []
        logits = self.forward(torch.tensor([list(ids)]), cache)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(torch.argmax(logits[0, -1]))
            out.append(nxt)
            if on_token:
                on_token(nxt)
            if eos is not None and nxt == eos:
                break
            logits = self.forward(torch.tensor([[nxt]]), cache)
        return out


def perplexity(model: Reference, ids: Sequence[int]) -> tuple[float, int]:
    """(sum of negative log-likelihood, number of predicted tokens) of one document."""
    ids = torch.tensor([list(ids)])
    if ids.shape[1] < 2:
        return 0.0, 0
    logits = model.forward(ids)[0, :-1]
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return float(nll), ids.shape[1] - 1

