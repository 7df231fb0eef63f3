"""Rotary position embeddings: inverse frequencies and attention scaling for each supported `rope_scaling`
type (default, linear, dynamic NTK, YaRN, Llama-3), following the Hugging Face definitions EMO inherits.

`dynamic` depends on the sequence length: we use the length implied by the largest position in the call
(`max(position) + 1`), which equals the upstream cached behaviour for sequences that grow monotonically.
"""

from __future__ import annotations

import math

import numpy as np

from .spec import EmoSpec


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    # Computed as torch does it upstream: int64 arange -> float32, then base ** (float32 exponent).
    exponent = (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)).astype(np.float32)
    return (1.0 / (np.float32(base) ** exponent)).astype(np.float32)


def _yarn(spec: EmoSpec, rope: dict) -> tuple[np.ndarray, float]:
    base, dim, factor = spec.rope_theta, spec.head_dim, float(rope["factor"])
    if "original_max_position_embeddings" in rope:
        original = rope["original_max_position_embeddings"]
        if spec.max_position_embeddings:
            factor = spec.max_position_embeddings / original
    else:
        original = spec.max_position_embeddings

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all \
            else get_mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_factor = 1 - ramp
    pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(np.float32)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(factor) * pos_freqs)
    inv = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv.astype(np.float32), float(attention)


def _llama3(spec: EmoSpec, rope: dict) -> np.ndarray:
    inv = _default_inv_freq(spec.rope_theta, spec.head_dim)
    factor, low_f, high_f = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_f, old_len / high_f
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_freq(spec: EmoSpec, seq_len: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies of shape (head_dim/2,), attention scaling applied to cos and sin)."""
    rope, base, dim = spec.rope_scaling, spec.rope_theta, spec.head_dim
    kind = spec.rope_type
    if kind == "default":
        return _default_inv_freq(base, dim), 1.0
    if kind == "linear":
        return (_default_inv_freq(base, dim) / np.float32(rope["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(spec, rope), 1.0
    if kind == "yarn":
        return _yarn(spec, rope)
    if kind == "dynamic":
        original = spec.max_position_embeddings or rope["original_max_position_embeddings"]
        if seq_len <= original:
            return _default_inv_freq(base, dim), 1.0
        factor = rope["factor"]
        base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim), 1.0
    raise ValueError(kind)  # unreachable: spec validation refuses other types


def cos_sin(spec: EmoSpec, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables of shape (*positions.shape, head_dim) in float32 (HF `rotate_half` layout)."""
    positions = np.asarray(positions, dtype=np.int64)
    inv, scale = inv_freq(spec, int(positions.max()) + 1 if positions.size else 1)
    freqs = positions.astype(np.float32)[..., None] * inv  # (..., head_dim/2)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return (np.cos(emb) * np.float32(scale)).astype(np.float32), (np.sin(emb) * np.float32(scale)).astype(np.float32)
