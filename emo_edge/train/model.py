"""A small EMO decoder in PyTorch, with training-time routing variants.

Inference semantics (what `routing="full"` computes) match the upstream EMO checkpoint exactly:
pre-norm blocks `h = x + attn(rms(x))`, `out = h + moe(rms(h))`, float32 RMSNorm, HF-convention rotary
embeddings, causal softmax attention (scale head_dim^-0.5, GQA), final norm and an untied head. The MoE layer
has one shared expert, the LAST id: softmax over the first E-1 router logits, top-(k-1) of those weighted by
their (un-renormalised) probabilities, plus the shared expert with weight exactly 1.0.

Training routing:
- "emo":  per document and layer, the pool is the top-N routed experts by router probability summed over the
          document's tokens (detached), N drawn per document uniformly from [pool_min, pool_max]; the other
          routed experts' logits are set to -inf before the routed softmax. Load balancing is computed over all
          tokens of the batch (many documents), on the probabilities actually used.
- "topk": the standard token-level top-k with the usual load-balancing loss (the twin).
Both use the same load-balancing formula: n_routed * sum_i f_i * P_i over the batch's real tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.reference import rms_norm, rotate_half  # the same numerics as the reference the checkpoints are checked by


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 80
    num_experts: int = 32  # the last one is shared
    top_k: int = 4  # shared included
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (B, T) int -> cos, sin (B, T, head_dim) in float32 (HF convention: freqs concatenated twice)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = pos.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, M = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.E, self.k = E, cfg.top_k
        self.gate = nn.Parameter(torch.empty(E, H))  # router
        # one parameter per expert matrix: slicing a stacked tensor would make autograd allocate and fill a
        # full-size gradient for every expert call
        self.w_gate = nn.ParameterList(nn.Parameter(torch.empty(M, H)) for _ in range(E))
        self.w_up = nn.ParameterList(nn.Parameter(torch.empty(M, H)) for _ in range(E))
        self.w_down = nn.ParameterList(nn.Parameter(torch.empty(H, M)) for _ in range(E))

    def expert(self, j: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w_gate[j].T) * (x @ self.w_up[j].T)) @ self.w_down[j].T

    def forward(self, x: torch.Tensor, route: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) float32. route: {"mode": "full"|"topk"|"emo", "seg": (N,) segment id per token (emo),
        "pool_n": (S,) pool size per segment (emo), "valid": (N,) bool real tokens (for the aux loss)}.
        Returns (out (N, H), aux loss scalar)."""
        N, _ = x.shape
        R = self.E - 1  # routed experts
        kr = self.k - 1
        logits = x @ self.gate.T  # (N, E)
        routed = logits[:, :R]
        mode = route.get("mode", "full")
        if mode == "emo":
            seg, pool_n = route["seg"], route["pool_n"]
            S = pool_n.shape[0]
            with torch.no_grad():
                p = torch.softmax(routed.detach(), dim=-1)
                valid = route["valid"]
                sums = torch.zeros(S + 1, R, dtype=p.dtype).index_add_(0, torch.where(valid, seg, S), p)[:S]
                order = sums.argsort(dim=-1, descending=True)
                keep = torch.arange(R)[None, :] < pool_n[:, None]
                pool = torch.zeros(S, R, dtype=torch.bool).scatter_(1, order, keep)
                tok_pool = pool[seg.clamp(max=S - 1)]
            routed = routed.masked_fill(~tok_pool, float("-inf"))
        probs = torch.softmax(routed, dim=-1)
        topw, topi = torch.topk(probs, kr, dim=-1)  # (N, kr)
        out = self.expert(R, x)  # shared expert: weight exactly 1.0 (softmax over its single logit)
        # routed experts: sort (token, slot) pairs by expert and run each expert on its tokens
        flat_e = topi.reshape(-1)
        order = flat_e.argsort(stable=True)
        tok = order // kr
        counts = torch.bincount(flat_e, minlength=R).tolist()
        w_sorted = topw.reshape(-1)[order]
        xs = x[tok]
        ys = []
        start = 0
        for j, c in enumerate(counts):
            if c:
                ys.append(self.expert(j, xs[start:start + c]))
            start += c
        y = torch.cat(ys, 0) * w_sorted[:, None]
        out = out.index_add(0, tok, y)
        aux = x.new_zeros(())
        if mode != "full" and self.training:
            valid = route["valid"].float()
            nv = valid.sum().clamp(min=1)
            f = torch.zeros(R).index_add_(0, flat_e, valid.repeat_interleave(kr)) / (nv * kr)
            P = (probs * valid[:, None]).sum(0) / nv
            aux = R * (f.detach() * P).sum()
        return out, aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.attn_norm = nn.Parameter(torch.ones(H))
        self.ffn_norm = nn.Parameter(torch.ones(H))
        self.q = nn.Linear(H, cfg.num_heads * hd, bias=False)
        self.k = nn.Linear(H, cfg.num_kv_heads * hd, bias=False)
        self.v = nn.Linear(H, cfg.num_kv_heads * hd, bias=False)
        self.o = nn.Linear(cfg.num_heads * hd, H, bias=False)
        self.moe = MoELayer(cfg)

    def forward(self, x, cos, sin, mask, route):
        cfg = self.cfg
        B, T, H = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        h = rms_norm(x, self.attn_norm, cfg.rms_norm_eps)
        q = self.q(h).view(B, T, nh, hd).transpose(1, 2)
        k = self.k(h).view(B, T, nkv, hd).transpose(1, 2)
        v = self.v(h).view(B, T, nkv, hd).transpose(1, 2)
        c, s = cos[:, None], sin[:, None]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        if mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd ** -0.5)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, nh * hd))
        h = rms_norm(x, self.ffn_norm, cfg.rms_norm_eps)
        m, aux = self.moe(h.reshape(B * T, H), route)
        return x + m.view(B, T, H), aux


class TinyEmo(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def init_weights(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        std = 0.02
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0)
                elif name.endswith("o.weight") or ".w_down." in name:
                    p.normal_(0.0, out_std, generator=g)
                else:
                    p.normal_(0.0, std, generator=g)

    def forward(self, ids: torch.Tensor, *, pos: torch.Tensor | None = None, seg: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, mode: str = "full", pool_range: tuple[int, int] = (1, 1),
                gen: torch.Generator | None = None):
        """ids (B, T). Without `seg`: one causal sequence per row (inference). With `seg` (B, T) segment ids
        (documents packed in a row; -1 = padding): attention stays inside each segment and, for mode "emo",
        each segment gets its own expert pool. Returns (logits (B, T, V) float32, aux loss)."""
        B, T = ids.shape
        mask = None
        route: dict = {"mode": mode}
        if pos is None:
            pos = torch.arange(T)[None].expand(B, T)
        if seg is not None:
            same = seg[:, :, None] == seg[:, None, :]
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            mask = (same & causal)[:, None]  # padding (-1) attends to padding: no empty rows
            # global segment ids over the batch
            S_row = int(seg.max()) + 1 if seg.numel() else 1
            gseg = torch.where(seg >= 0, seg + torch.arange(B)[:, None] * S_row, 0)
            route["seg"] = gseg.reshape(-1)
            route["valid"] = (seg >= 0).reshape(-1) if valid is None else valid.reshape(-1)
            if mode == "emo":
                route["pool_n"] = torch.randint(pool_range[0], pool_range[1] + 1, (B * S_row,), generator=gen)
        elif mode != "full":
            route["valid"] = torch.ones(B * T, dtype=torch.bool) if valid is None else valid.reshape(-1)
            route["seg"] = torch.arange(B)[:, None].expand(B, T).reshape(-1)
            if mode == "emo":
                route["pool_n"] = torch.randint(pool_range[0], pool_range[1] + 1, (B,), generator=gen)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed(ids).float()
        aux = x.new_zeros(())
        for layer in self.layers:
            x, a = layer(x, cos, sin, mask, route)
            aux = aux + a
        x = rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        return self.lm_head(x), aux / len(self.layers)


# ---- HF checkpoint names <-> our parameters ------------------------------------------------------------------
def hf_state(model: TinyEmo) -> dict[str, torch.Tensor]:
    """Our parameters under the upstream HF tensor names (float32, nn.Linear layout)."""
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm,
           "lm_head.weight": model.lm_head.weight}
    for i, L in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "pre_attention_layernorm.weight"] = L.attn_norm
        out[p + "pre_feedforward_layernorm.weight"] = L.ffn_norm
        for n in "qkvo":
            out[p + f"self_attn.{n}_proj.weight"] = getattr(L, n).weight
        out[p + "mlp.gate.weight"] = L.moe.gate
        for j in range(model.cfg.num_experts):
            out[p + f"mlp.experts.{j}.gate_proj.weight"] = L.moe.w_gate[j]
            out[p + f"mlp.experts.{j}.up_proj.weight"] = L.moe.w_up[j]
            out[p + f"mlp.experts.{j}.down_proj.weight"] = L.moe.w_down[j]
    return {k: v.detach().float() for k, v in out.items()}


def load_hf_state(model: TinyEmo, get) -> None:
    """Fill `model` from `get(hf_name) -> float32 numpy array`."""
    with torch.no_grad():
        model.embed.weight.copy_(torch.from_numpy(get("model.embed_tokens.weight")))
        model.norm.copy_(torch.from_numpy(get("model.norm.weight")))
        model.lm_head.weight.copy_(torch.from_numpy(get("lm_head.weight")))
        for i, L in enumerate(model.layers):
            p = f"model.layers.{i}."
            L.attn_norm.copy_(torch.from_numpy(get(p + "pre_attention_layernorm.weight")))
            L.ffn_norm.copy_(torch.from_numpy(get(p + "pre_feedforward_layernorm.weight")))
            for n in "qkvo":
                getattr(L, n).weight.copy_(torch.from_numpy(get(p + f"self_attn.{n}_proj.weight")))
            L.moe.gate.copy_(torch.from_numpy(get(p + "mlp.gate.weight")))
            for j in range(model.cfg.num_experts):
                L.moe.w_gate[j].copy_(torch.from_numpy(get(p + f"mlp.experts.{j}.gate_proj.weight")))
                L.moe.w_up[j].copy_(torch.from_numpy(get(p + f"mlp.experts.{j}.up_proj.weight")))
                L.moe.w_down[j].copy_(torch.from_numpy(get(p + f"mlp.experts.{j}.down_proj.weight")))
