"""An independent, deliberately plain EMO forward for tests: float64 numpy, one token at a time, one head at a
time, experts chosen by sorting in Python. It reads fp32 checkpoints with the safetensors library (not our
reader) and parses config.json itself (not through EmoSpec), following the upstream modeling code's rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def load_weights(root: Path) -> dict[str, np.ndarray]:
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update({k: v.astype(np.float64) for k, v in load_file(str(root / f)).items()})
    return out


def layer_plan(cfg: dict) -> list[dict]:
    L = cfg["num_hidden_layers"]
    counts = cfg.get("num_experts_per_layer") or [cfg["num_experts"]] * L
    shared = cfg.get("num_shared_experts_per_layer")
    if cfg.get("num_experts_per_layer") is None:
        shared = [cfg.get("num_shared_experts", 0)] * L
    elif shared is None:
        shared = [min(cfg.get("num_shared_experts", 0), n) for n in counts]
    always = cfg.get("always_active_experts_per_layer")
    if always is None and cfg.get("always_active_experts") is not None:
        always = [cfg["always_active_experts"]] * L
    return [{"E": counts[i], "shared": shared[i], "always": list(always[i]) if always and always[i] else []}
            for i in range(L)]


def inv_freqs(cfg: dict, dim: int, seq_len: int) -> tuple[list[float], float]:
    base = cfg.get("rope_theta", 500000.0)
    freqs = [base ** (-(2 * i) / dim) for i in range(dim // 2)]
    rs = cfg.get("rope_scaling")
    if not rs:
        return freqs, 1.0
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return [f / rs["factor"] for f in freqs], 1.0
    if kind == "dynamic":
        orig = cfg["max_position_embeddings"]
        if seq_len <= orig:
            return freqs, 1.0
        f = rs["factor"]
        base2 = base * ((f * seq_len / orig) - (f - 1)) ** (dim / (dim - 2))
        return [base2 ** (-(2 * i) / dim) for i in range(dim // 2)], 1.0
    if kind == "llama3":
        f, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
        out = []
        for fr in freqs:
            wl = 2 * math.pi / fr
            if wl < old / hi:
                out.append(fr)
            elif wl > old / lo:
                out.append(fr / f)
            else:
                s = (old / wl - lo) / (hi - lo)
                out.append((1 - s) * fr / f + s * fr)
        return out, 1.0
    if kind == "yarn":
        f = rs["factor"]
        orig = rs.get("original_max_position_embeddings")
        if orig is not None:
            f = cfg["max_position_embeddings"] / orig
        else:
            orig = cfg["max_position_embeddings"]
        att = rs.get("attention_factor") or (1.0 if f <= 1 else 0.1 * math.log(f) + 1.0)
        fast, slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
        cdim = lambda r: dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
        low, high = max(math.floor(cdim(fast)), 0), min(math.ceil(cdim(slow)), dim - 1)
        if low == high:
            high += 0.001
        out = []
        for i, fr in enumerate(freqs):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)
            extra = 1 - ramp
            out.append((fr / f) * (1 - extra) + fr * extra)
        return out, att
    raise ValueError(kind)


def rms(x, w, eps):
    return w * x / math.sqrt(float(np.mean(x * x)) + eps)


def silu(z):
    return z / (1 + np.exp(-z))


def softmax(v):
    m = max(v)
    e = [math.exp(a - m) if a != -math.inf else 0.0 for a in v]
    s = sum(e)
    return [a / s for a in e]


def topk_ids(scores: list[float], k: int, exclude=()) -> list[int]:
    cand = [i for i in range(len(scores)) if i not in exclude]
    return sorted(cand, key=lambda i: -scores[i])[:k]


def moe_token(x, W, prefix, plan, cfg, allowed):
    E, k = plan["E"], cfg["num_experts_per_tok"]
    logits = [float(W[f"{prefix}.gate.weight"][j] @ x) for j in range(E)]
    if allowed is not None:
        logits = [lg if j in allowed else -math.inf for j, lg in enumerate(logits)]
    chosen: list[tuple[int, float]] = []
    if plan["always"]:
        p = softmax(logits)
        routed = topk_ids(p, k - len(plan["always"]), exclude=set(plan["always"]))
        chosen = [(j, p[j]) for j in plan["always"] + routed]
    elif plan["shared"] > 0:
        s = plan["shared"]
        pr, ps = softmax(logits[: E - s]), softmax(logits[E - s:])
        chosen = [(j, pr[j]) for j in topk_ids(pr, k - s)] + [(E - s + j, ps[j]) for j in range(s)]
    else:
        p = softmax(logits)
        chosen = [(j, p[j]) for j in topk_ids(p, k)]
        if cfg.get("norm_topk_prob"):
            tot = sum(w for _, w in chosen)
            chosen = [(j, w / tot) for j, w in chosen]
    out = np.zeros_like(x)
    for j, w in chosen:
        e = f"{prefix}.experts.{j}"
        out += w * (W[f"{e}.down_proj.weight"] @ (silu(W[f"{e}.gate_proj.weight"] @ x) * (W[f"{e}.up_proj.weight"] @ x)))
    return out


def oracle_logits(root: str | Path, ids: list[int], pool: list | None = None) -> np.ndarray:
    root = Path(root)
    cfg = json.loads((root / "config.json").read_text())
    W = load_weights(root)
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    plans = layer_plan(cfg)
    bias = cfg.get("attention_bias", False)
    freqs, att = inv_freqs(cfg, hd, len(ids))
    keys = [[] for _ in plans]
    vals = [[] for _ in plans]
    out_logits = []
    for t, tok in enumerate(ids):
        h = W["model.embed_tokens.weight"][tok].copy()
        ang = [t * f for f in freqs]
        cos = np.array([math.cos(a) for a in ang] * 2) * att
        sin = np.array([math.sin(a) for a in ang] * 2) * att

        def rope(v):
            half = hd // 2
            rot = np.concatenate([-v[half:], v[:half]])
            return v * cos + rot * sin

        for i, plan in enumerate(plans):
            p = f"model.layers.{i}"
            x = rms(h, W[f"{p}.pre_attention_layernorm.weight"], eps)
            proj = {}
            for n in "qkvo":
                proj[n] = W[f"{p}.self_attn.{n}_proj.weight"]
            q = proj["q"] @ x + (W[f"{p}.self_attn.q_proj.bias"] if bias else 0)
            k = proj["k"] @ x + (W[f"{p}.self_attn.k_proj.bias"] if bias else 0)
            v = proj["v"] @ x + (W[f"{p}.self_attn.v_proj.bias"] if bias else 0)
            keys[i].append([rope(k[g * hd:(g + 1) * hd]) for g in range(nkv)])
            vals[i].append([v[g * hd:(g + 1) * hd] for g in range(nkv)])
            heads = []
            for head in range(nh):
                g = head // (nh // nkv)
                qh = rope(q[head * hd:(head + 1) * hd])
                scores = [float(qh @ keys[i][s][g]) / math.sqrt(hd) for s in range(t + 1)]
                probs = softmax(scores)
                heads.append(sum(pr * vals[i][s][g] for s, pr in enumerate(probs)))
            a = proj["o"] @ np.concatenate(heads) + (W[f"{p}.self_attn.o_proj.bias"] if bias else 0)
            h = h + a
            x = rms(h, W[f"{p}.pre_feedforward_layernorm.weight"], eps)
            if plan["E"] == 0:
                b = (lambda n: W[f"{p}.mlp.{n}_proj.bias"]) if cfg.get("dense_mlp_bias") else (lambda n: 0)
                g_ = W[f"{p}.mlp.gate_proj.weight"] @ x + b("gate")
                u_ = W[f"{p}.mlp.up_proj.weight"] @ x + b("up")
                h = h + W[f"{p}.mlp.down_proj.weight"] @ (silu(g_) * u_) + b("down")
            else:
                allowed = None
                if pool is not None and pool[i] is not None:
                    implicit = set(plan["always"]) if plan["always"] else set(range(plan["E"] - plan["shared"], plan["E"]))
                    allowed = set(pool[i]) | implicit
                h = h + moe_token(x, W, f"{p}.mlp", plan, cfg, allowed)
        hn = rms(h, W["model.norm.weight"], eps)
        head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else W["lm_head.weight"]
        out_logits.append(head @ hn)
    return np.stack(out_logits)
