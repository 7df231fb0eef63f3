"""Weight-only block-wise quantization in the exact byte layouts onnxruntime's contrib ops read.

Design note (verified against onnxruntime 1.32's own op schemas and CPU kernels by tests/export/test_quant.py)
-------------------------------------------------------------------------------------------------
Numbers: a weight matrix is W[N, K] (out features x in features, the torch Linear layout). It is cut into
blocks of `block_size` consecutive elements along K (the last block zero-padded when K % block_size != 0);
each (row, block) has one scale and, when asymmetric, one zero point.

    symmetric  : scale = absmax / (2^(b-1) - 1);  zp = 2^(b-1) (8 for int4, 128 for int8; not stored)
    asymmetric : lo = min(w, 0), hi = max(w, 0); scale = (hi - lo) / (2^b - 1); zp = clip(rint(-lo / scale))
    code       : q = clip(rint(w / scale) + zp, 0, 2^b - 1)        (rint = round half to even)
    dequantize : w' = float32(q - zp) * float32(scale)             (scale after its cast to scale_dtype)

The scale is cast to the scheme's scale dtype *before* the codes are computed, so the stored scale is the one
the codes were rounded against; `dequantize` is the single definition of the runtime numbers.

Byte layouts (all uint8; "LSB first" = element 2j in bits 0-3, element 2j+1 in bits 4-7 of byte j):
  * MatMulNBits (com.microsoft, bits=b, block_size=bs, K, N attrs):
      B           [N, n_blocks, bs*b/8]  codes, packed LSB first along K within each block
      scales      [N, n_blocks]          float32/float16 (same dtype as A)
      zero_points [N, ceil(n_blocks*b/8)] packed LSB first along the block axis; omitted when symmetric
                                          (ORT then assumes 2^(b-1), i.e. exactly our symmetric zp)
  * GatherBlockQuantized (embedding table E[V, H] quantized along H, gathered along V):
      data uint8 [V, H*b/8] (= B reshaped, so a tied lm_head MatMulNBits and the embedding gather can share
      bytes), scales [V, H/bs], zero_points uint8 [V, ceil((H/bs)*b/8)] or omitted (default 2^(b-1) for uint8
      data); attrs bits=b, block_size=bs, gather_axis=0, quantize_axis=1. H % bs == 0 is required.
  * QMoE (quant_type='int', weights_prepacked=0, expert_weight_bits=b, block_size=bs):
      fc1_experts_weights [E, 2I, H*b/8]  rows interleaved gate0, up0, gate1, up1, ... (swiglu_fusion=1)
      fc1_scales          [E, 2I, H/bs]   fc1_zero_points [E, 2I, ceil((H/bs)*b/8)]
      fc2_experts_weights [E, H, I*b/8]   fc2_scales [E, H, I/bs]  fc2_zero_points [E, H, ceil((I/bs)*b/8)]
      i.e. each expert's projection is byte-for-byte the MatMulNBits B of that projection.

EMO semantics with QMoE (see exporters/ort_ops.py and tests/export/test_quant.py::test_qmoe_emo_routing):
  activation_type='swiglu', swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, no swiglu_limit
  => G*sigmoid(1*G)*(L+0) = silu(gate)*up exactly. normalize_routing_weights=0, use_sparse_mixer=0.
  router_probs   = selection scores (routed logits; forced experts get +3e4), only their order matters;
  router_weights = the mixing weights EMO wants (full softmax; 1.0 for the shared expert), gathered at the
                   chosen indices without any renormalisation. Shared/always-active experts therefore live
                   inside the same QMoE (one node per layer, k = the model's k). Without router_weights the CPU
                   kernel softmaxes the top-k router_probs whatever normalize_routing_weights says (that equals
                   norm_topk_prob=True, and only that).

Accuracy levels (measured, random N(0,1) data, K=2048): MatMulNBits/QMoE accuracy_level=4 quantizes activations
to int8 per block: 5.7e-3 relative output error vs x @ dequantize(W)^T (acc0: 8e-7). Against the int4 weight
error itself (1.0e-1 relative for bs32) that is noise; for int8 weights (5.5e-3) it doubles the error. 8-bit
QMoE on CPU has no fp32 path and always uses int8 activations (env ORT_QMOE_CPU_QNBIT_GEMM=fp32 forces fp32).

Choices of ours (ORT only reads the result): symmetric scale = absmax/7 (int4) / absmax/127 (int8), so code 0
is unused but nothing clips; ORT's own quantizer uses max/-8 (finer step, clips the opposite extreme). With
`rounding="search"` (what plans use) each block takes, of a few candidate scales between absmax/8 and absmax/6.5
(absmax/7 among them), of either sign, and a least-squares refit, the one of least squared error; codes then
span [-8, 7], the extremes may clip where that lowers the block's error, and a scale may be negative (it maps the
positive extreme onto -8, the code range's longer side; onnxruntime's kernels only multiply by the scale, as
tests/export/test_quant.py checks). Relative RMS error on N(0,1) weights, int4: absmax/7 0.097 (block 32), 0.108 (64),
0.117 (128); search 0.083, 0.093, 0.102; llama.cpp's Q4_0 rule (signed max / -8) 0.086 (32), 0.103 (128).
GatherBlockQuantized also takes int4/uint4-typed data (default zero point 0 there); we use uint8 + `bits` so
the embedding shares the MatMulNBits byte layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

_SCALE_DTYPES = {"float32": np.float32, "float16": np.float16}
ROUNDINGS = ("absmax", "search")
# "search": per block, the scale absmax / (h * r) for r in these ratios (h = 2^(b-1); r = 7/8 is absmax's own
# scale for int4, so a block's error is never worse), then one least-squares refit of the best candidate's codes
_SEARCH_RATIOS = (0.8125, 0.875, 0.90625, 0.9375, 0.96875, 1.0)  # measured: more candidates gain < 0.5%


@dataclass(frozen=True)
class QuantScheme:
    """How one weight is quantized. JSON-serialisable; `block_size` comes from the target (32 default)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    scale_dtype: str = "float32"
    rounding: str = "absmax"  # symmetric scales: "absmax" (absmax / (2^(b-1) - 1)) or "search" (see `_search_scale`)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        bs = self.block_size
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {bs}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def default_zero_point(self) -> int:
        """The zero point ORT assumes when none is given (MatMulNBits, QMoE, uint8 GatherBlockQuantized)."""
        return 1 << (self.bits - 1)

    @property
    def blob_size(self) -> int:
        return self.block_size * self.bits // 8

    def n_blocks(self, k: int) -> int:
        return -(-k // self.block_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantScheme":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class QuantizedTensor:
    """A block-quantized W[N, K] in MatMulNBits layout (see module docstring)."""

    packed: np.ndarray  # uint8 [N, n_blocks, blob_size]
    scales: np.ndarray  # scale_dtype [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(n_blocks * bits / 8)], None when symmetric
    shape: tuple[int, int]  # logical (N, K)
    scheme: QuantScheme

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.packed.nbytes + self.scales.nbytes + zp


# ---------------------------------------------------------------- bit packing (pure)

def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, LSB first. The last axis is zero-padded to a whole byte."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.copy()
    if bits != 4:
        raise ValueError(f"unsupported bits {bits}")
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` codes of the last axis."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :count].copy()
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :count]


# ---------------------------------------------------------------- quantize / dequantize (pure)

def _blocked(w: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    n, k = w.shape
    nb = scheme.n_blocks(k)
    pad = nb * scheme.block_size - k
    if pad:
        w = np.concatenate([w, np.zeros((n, pad), np.float32)], axis=1)
    return w.reshape(n, nb, scheme.block_size)


def quantize_codes(w: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W[N, K] float -> (codes uint8 [N, nb, bs], scales scale_dtype [N, nb], zero points uint8 [N, nb])."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight has non-finite values")
    blk = _blocked(w, scheme)
    qmax = scheme.qmax
    sdt = _SCALE_DTYPES[scheme.scale_dtype]
    if scheme.symmetric:
        half = scheme.default_zero_point
        scale = (np.abs(blk).max(axis=-1) / np.float32(half - 1)).astype(sdt)
        if scheme.rounding == "search":
            scale = _search_scale(blk, scale, half, sdt)
        zp = np.full(scale.shape, half, np.uint8)
    else:
        lo = np.minimum(blk.min(axis=-1), 0.0)
        hi = np.maximum(blk.max(axis=-1), 0.0)
        scale = ((hi - lo) / np.float32(qmax)).astype(sdt)
        s32 = scale.astype(np.float32)
        safe = np.where(s32 > 0, s32, np.float32(1.0))
        zp = np.clip(np.rint(-lo / safe), 0, qmax).astype(np.uint8)
    s32 = scale.astype(np.float32)
    safe = np.where(s32 != 0, s32, np.float32(1.0))[..., None]
    q = np.rint(blk / safe) + zp[..., None].astype(np.float32)
    q = np.where(s32[..., None] != 0, q, zp[..., None].astype(np.float32))
    codes = np.clip(q, 0, qmax).astype(np.uint8)
    return codes, scale, zp


def _sym_codes(blk: np.ndarray, scale: np.ndarray, half: int) -> np.ndarray:
    """Signed codes in [-half, half - 1] of each block against its (stored-dtype) scale; 0 where the scale is 0."""
    s32 = scale.astype(np.float32)[..., None]
    q = np.rint(blk / np.where(s32 != 0, s32, np.float32(1.0)))
    return np.where(s32 != 0, np.clip(q, -half, half - 1), np.float32(0.0))


def _sse(blk: np.ndarray, scale: np.ndarray, half: int) -> np.ndarray:
    d = blk - _sym_codes(blk, scale, half) * scale.astype(np.float32)[..., None]
    return np.einsum("...i,...i->...", d, d)


def _search_scale(blk: np.ndarray, absmax_scale: np.ndarray, half: int, sdt) -> np.ndarray:
    """Per block, the scale of least squared error among +-absmax / (half * r) for r in _SEARCH_RATIOS (a negative
    scale maps the block's positive extreme onto code -half: the range's longer side, as Q4_0 does), absmax's own
    scale, and a least-squares refit of the best candidate's codes. Candidates are compared as stored (cast to
    `sdt`), so the codes are always the nearest ones to the stored scale."""
    amax = np.abs(blk).max(axis=-1)
    best, best_err = absmax_scale, _sse(blk, absmax_scale, half)
    for sign in (1.0, -1.0):
        for r in _SEARCH_RATIOS:
            cand = (np.float32(sign) * amax / np.float32(half * r)).astype(sdt)
            err = _sse(blk, cand, half)
            better = err < best_err
            best, best_err = np.where(better, cand, best), np.where(better, err, best_err)
    q = _sym_codes(blk, best, half)
    qq = np.einsum("...i,...i->...", q, q)
    refit = (np.einsum("...i,...i->...", blk, q) / np.where(qq > 0, qq, 1)).astype(sdt)
    refit = np.where((qq > 0) & np.isfinite(refit.astype(np.float32)), refit, best)
    err = _sse(blk, refit, half)
    return np.where(err < best_err, refit, best).astype(sdt)


def quantize_blockwise(w: np.ndarray, scheme: QuantScheme) -> QuantizedTensor:
    """W[N, K] float32 -> QuantizedTensor in MatMulNBits layout."""
    codes, scales, zp = quantize_codes(w, scheme)
    packed = pack_bits(codes, scheme.bits)  # per block: bs is even, so per-block packing == per-row packing
    zps = None if scheme.symmetric else pack_bits(zp, scheme.bits)
    return QuantizedTensor(packed, scales, zps, (int(w.shape[0]), int(w.shape[1])), scheme)


def codes_of(qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [N, nb, bs], zero points uint8 [N, nb]) unpacked from a QuantizedTensor."""
    s = qt.scheme
    codes = unpack_bits(qt.packed, s.bits, s.block_size)
    nb = qt.scales.shape[1]
    if qt.zero_points is None:
        zp = np.full((qt.shape[0], nb), s.default_zero_point, np.uint8)
    else:
        zp = unpack_bits(qt.zero_points, s.bits, nb)
    return codes, zp


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """The runtime's numbers: float32 W'[N, K] = (q - zp) * scale."""
    codes, zp = codes_of(qt)
    diff = codes.astype(np.float32) - zp[..., None].astype(np.float32)
    w = diff * qt.scales.astype(np.float32)[..., None]
    return w.reshape(qt.shape[0], -1)[:, : qt.shape[1]]


# ---------------------------------------------------------------- op-specific layouts

def matmulnbits_inputs(qt: QuantizedTensor) -> dict[str, np.ndarray]:
    """B / scales / (zero_points) initializers and the attrs of a MatMulNBits computing x @ W^T."""
    out = {"B": qt.packed, "scales": qt.scales}
    if qt.zero_points is not None:
        out["zero_points"] = qt.zero_points
    return out


def matmulnbits_attrs(qt: QuantizedTensor, accuracy_level: int = 0) -> dict[str, int]:
    n, k = qt.shape
    return {"K": k, "N": n, "bits": qt.scheme.bits, "block_size": qt.scheme.block_size,
            "accuracy_level": accuracy_level}


def gather_block_quantized_inputs(table: np.ndarray, scheme: QuantScheme) -> tuple[QuantizedTensor, dict[str, np.ndarray]]:
    """Embedding table [V, H] -> uint8 `data` [V, H*bits/8], `scales` [V, H/bs], optional `zero_points`."""
    v, h = table.shape
    if h % scheme.block_size:
        raise ValueError(f"GatherBlockQuantized needs hidden {h} divisible by block_size {scheme.block_size}")
    qt = quantize_blockwise(table, scheme)
    out = {"data": qt.packed.reshape(v, -1), "scales": qt.scales}
    if qt.zero_points is not None:
        out["zero_points"] = qt.zero_points
    return qt, out


def gather_block_quantized_attrs(scheme: QuantScheme) -> dict[str, int]:
    return {"bits": scheme.bits, "block_size": scheme.block_size, "gather_axis": 0, "quantize_axis": 1}


def interleave_gate_up(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[I, H] gate and up -> [2I, H] with rows gate0, up0, gate1, up1, ... (swiglu_fusion=1)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {gate.shape} and up {up.shape} differ")
    w = np.empty((2 * gate.shape[0], gate.shape[1]), np.float32)
    w[0::2] = gate
    w[1::2] = up
    return w


@dataclass(frozen=True)
class QMoEWeights:
    """QMoE fc1/fc2 initializers for E experts (zero points None when symmetric)."""

    fc1_weights: np.ndarray  # uint8 [E, 2I, H*b/8]
    fc1_scales: np.ndarray  # [E, 2I, H/bs]
    fc1_zero_points: np.ndarray | None  # uint8 [E, 2I, ceil((H/bs)*b/8)]
    fc2_weights: np.ndarray  # uint8 [E, H, I*b/8]
    fc2_scales: np.ndarray  # [E, H, I/bs]
    fc2_zero_points: np.ndarray | None
    hidden: int
    inter: int
    scheme: QuantScheme

    @property
    def nbytes_per_expert(self) -> int:
        arrs = [self.fc1_weights, self.fc1_scales, self.fc1_zero_points,
                self.fc2_weights, self.fc2_scales, self.fc2_zero_points]
        return sum(a.nbytes for a in arrs if a is not None) // self.fc1_weights.shape[0]


def pack_qmoe(gates: list[np.ndarray], ups: list[np.ndarray], downs: list[np.ndarray],
              scheme: QuantScheme) -> tuple[QMoEWeights, list[tuple[QuantizedTensor, QuantizedTensor]]]:
    """Per-expert gate/up [I, H] and down [H, I] -> QMoE tensors (+ the per-expert QuantizedTensors).

    QMoE needs hidden and inter divisible by block_size."""
    inter, hidden = gates[0].shape
    for name, d in (("hidden", hidden), ("inter", inter)):
        if d % scheme.block_size:
            raise ValueError(f"QMoE needs {name} {d} divisible by block_size {scheme.block_size}")
    qts = [(quantize_blockwise(interleave_gate_up(g, u), scheme), quantize_blockwise(d, scheme))
           for g, u, d in zip(gates, ups, downs)]
    e = len(qts)
    fc1 = np.stack([a.packed.reshape(2 * inter, -1) for a, _ in qts])
    fc2 = np.stack([b.packed.reshape(hidden, -1) for _, b in qts])
    s1 = np.stack([a.scales for a, _ in qts])
    s2 = np.stack([b.scales for _, b in qts])
    z1 = z2 = None
    if not scheme.symmetric:
        z1 = np.stack([a.zero_points for a, _ in qts])
        z2 = np.stack([b.zero_points for _, b in qts])
    assert fc1.shape == (e, 2 * inter, hidden * scheme.bits // 8)
    return QMoEWeights(fc1, s1, z1, fc2, s2, z2, hidden, inter, scheme), qts
