"""Golden tests of emo_edge.quant against independent per-element code and against onnxruntime's own kernels.

What onnxruntime 1.32 (CPU) does, pinned here:
  * MatMulNBits accuracy_level 0 reproduces x @ dequantize(W)^T to fp32 rounding; accuracy_level 4 quantizes
    x to int8 per block (~1e-2 relative error on random data, see test_matmulnbits_acc4_error).
  * GatherBlockQuantized (uint8 data, bits 4/8) returns dequantize(W)[ids] bit for bit.
  * QMoE with router_weights mixes with the gathered router_weights, un-renormalised; without it, it softmaxes
    the top-k router_probs whatever normalize_routing_weights says. 8-bit QMoE uses int8 activations at every
    accuracy_level (ORT_QMOE_CPU_QNBIT_GEMM=fp32 restores exact fp32; not used in the tests).
  * swiglu with activation_alpha=1, activation_beta=0, swiglu_fusion=1 (rows gate0, up0, ...) is silu(g)*u.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from exporters import ort_ops  # noqa: E402
from emo_edge.quant import (  # noqa: E402
    QuantScheme,
    dequantize,
    gather_block_quantized_inputs,
    pack_qmoe,
    quantize_blockwise,
)

SCHEMES = [QuantScheme(b, 32, s) for b in (4, 8) for s in (True, False)]
IDS = [f"int{s.bits}-{'sym' if s.symmetric else 'asym'}" for s in SCHEMES]
# what the kernels must also read: searched scales, of which about 40 % are negative
ORT_SCHEMES = SCHEMES + [QuantScheme(b, 32, True, rounding="search") for b in (4, 8)]
ORT_IDS = IDS + ["int4-search", "int8-search"]


# ---------------------------------------------------------------- independent reference (plain Python)

def ref_quant_dequant(w: np.ndarray, bits: int, bs: int, sym: bool, scale_dtype=np.float32) -> np.ndarray:
    """Element by element: the documented formulas, no vectorisation, no shared code."""
    n, k = w.shape
    out = np.zeros((n, k), np.float32)
    qmax = 2 ** bits - 1
    for r in range(n):
        for b0 in range(0, k, bs):
            blk = [float(v) for v in w[r, b0:b0 + bs]]
            if sym:
                zp = 2 ** (bits - 1)
                scale = float(scale_dtype(np.float32(max(abs(v) for v in blk)) / np.float32(zp - 1)))
            else:
                lo, hi = min(min(blk), 0.0), max(max(blk), 0.0)
                scale = float(scale_dtype(np.float32(hi - lo) / np.float32(qmax)))
                zp = min(max(round(float(np.float32(-lo) / np.float32(scale))), 0), qmax) if scale > 0 else 0
            for j, v in enumerate(blk):
                if scale > 0:
                    q = min(max(round(float(np.float32(v) / np.float32(scale))) + zp, 0), qmax)
                else:
                    q = zp
                out[r, b0 + j] = np.float32(q - zp) * np.float32(scale)
    return out


def ref_unpack_row(packed_row: np.ndarray, bits: int, count: int) -> list[int]:
    vals = []
    for byte in packed_row.reshape(-1).tolist():
        if bits == 8:
            vals.append(byte)
        else:
            vals += [byte & 15, byte >> 4]
    return vals[:count]


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_quant_dequant_matches_elementwise_reference(scheme):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 96)).astype(np.float32) * rng.uniform(0.01, 3, (5, 1)).astype(np.float32)
    w[1, :32] = 0.0  # an all-zero block
    w[2, 32:64] = np.abs(w[2, 32:64])  # a one-signed block (asymmetric zero point at the edge)
    qt = quantize_blockwise(w, scheme)
    assert qt.packed.shape == (5, 3, scheme.blob_size) and qt.packed.dtype == np.uint8
    assert qt.scales.shape == (5, 3)
    if scheme.symmetric:
        assert qt.zero_points is None
    else:
        assert qt.zero_points.shape == (5, math.ceil(3 * scheme.bits / 8))
    np.testing.assert_array_equal(dequantize(qt), ref_quant_dequant(w, scheme.bits, 32, scheme.symmetric))
    # the packed bytes, read independently, give the same numbers
    for r in range(5):
        codes = ref_unpack_row(qt.packed[r], scheme.bits, 96)
        zps = (ref_unpack_row(qt.zero_points[r], scheme.bits, 3) if qt.zero_points is not None
               else [scheme.default_zero_point] * 3)
        row = [np.float32(codes[c] - zps[c // 32]) * np.float32(qt.scales[r, c // 32]) for c in range(96)]
        np.testing.assert_array_equal(np.array(row, np.float32), dequantize(qt)[r])
    err = np.abs(dequantize(qt) - w).reshape(5, 3, 32).max(-1)
    assert np.all(err <= qt.scales.astype(np.float32) * 0.5 + 1e-7)


def ref_search_codes(w: np.ndarray, scales: np.ndarray, bits: int, bs: int) -> np.ndarray:
    """Element by element: the nearest signed code to w / scale in [-2^(b-1), 2^(b-1) - 1], times the scale."""
    half = 2 ** (bits - 1)
    out = np.zeros(w.shape, np.float32)
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            s = float(np.float32(scales[r, c // bs]))
            q = min(max(round(float(np.float32(w[r, c]) / np.float32(s))), -half), half - 1) if s != 0 else 0
            out[r, c] = np.float32(q) * np.float32(s)
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_search_rounding_is_nearest_codes_and_never_worse_than_absmax(bits, scale_dtype):
    """`rounding="search"`: the codes are the nearest to the stored scale (checked element by element), no block's
    squared error exceeds absmax/(2^(b-1)-1)'s, and on Gaussian weights the error drops clearly (int4: ~15 %)."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((24, 256)).astype(np.float32) * rng.uniform(0.01, 3, (24, 1)).astype(np.float32)
    w[1, :32] = 0.0  # an all-zero block keeps scale 0
    w[2, 32:64] = np.abs(w[2, 32:64])  # one-signed blocks
    w[3, 64:96] = -np.abs(w[3, 64:96])
    search = quantize_blockwise(w, QuantScheme(bits, 32, True, scale_dtype, "search"))
    plain = quantize_blockwise(w, QuantScheme(bits, 32, True, scale_dtype))
    assert search.zero_points is None and search.scales.dtype == plain.scales.dtype
    assert search.scales[1, 0] == 0 and (search.scales < 0).any() and (search.scales > 0).any()
    deq = dequantize(search)
    np.testing.assert_array_equal(deq, ref_search_codes(w, search.scales, bits, 32))
    err_s = ((deq - w) ** 2).reshape(24, -1, 32).sum(-1)
    err_p = ((dequantize(plain) - w) ** 2).reshape(24, -1, 32).sum(-1)
    assert np.all(err_s <= err_p * (1 + 1e-6) + 1e-30)
    gain = 1 - np.sqrt(err_s.sum() / err_p.sum())
    assert gain > (0.10 if bits == 4 else 0.005), gain


def test_fp16_scales_and_ragged_k():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 80)).astype(np.float32)  # 80 = 2.5 blocks of 32: the last is zero-padded
    scheme = QuantScheme(4, 32, False, "float16")
    qt = quantize_blockwise(w, scheme)
    assert qt.scales.dtype == np.float16 and qt.packed.shape == (3, 3, 16)
    padded = np.concatenate([w, np.zeros((3, 16), np.float32)], 1)
    np.testing.assert_array_equal(dequantize(qt), ref_quant_dequant(padded, 4, 32, False, np.float16)[:, :80])


def test_scheme_json_roundtrip_and_validation():
    s = QuantScheme(8, 64, False, "float16")
    assert QuantScheme.from_json(s.to_json()) == s
    for bad in ({"bits": 3}, {"block_size": 24}, {"block_size": 8}, {"scale_dtype": "bfloat16"}, {"rounding": "mse"}):
        with pytest.raises(ValueError):
            QuantScheme(**bad)


# ---------------------------------------------------------------- onnxruntime one-node graphs

def _session(nodes, inits, inputs: dict[str, np.ndarray], out: str):
    def vi(name, a):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
    g = helper.make_graph(nodes, "g", [vi(k, v) for k, v in inputs.items()],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run([out], inputs)[0]


def _run_matmulnbits(w, x, scheme, acc):
    qt = quantize_blockwise(w, scheme)
    nodes, inits, out = ort_ops.matmul_nbits("/t/lin", "x", qt, acc)
    assert nodes[0].name == "/t/lin/MatMulNBits"
    return _session(nodes, inits, {"x": x}, out), x.astype(np.float64) @ dequantize(qt).astype(np.float64).T


@pytest.mark.parametrize("scheme", ORT_SCHEMES, ids=ORT_IDS)
def test_matmulnbits_acc0_equals_numpy(scheme):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 128)).astype(np.float32)
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    y, ref = _run_matmulnbits(w, x, scheme, 0)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rounding", ["absmax", "search"])
def test_matmulnbits_acc4_error(bits, rounding):
    """accuracy_level 4 quantizes activations to int8 per block: ~0.3-1 % relative error on random data."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    y, ref = _run_matmulnbits(w, x, QuantScheme(bits, 32, True, rounding=rounding), 4)
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert 1e-5 < rel < 3e-2, rel  # measurably not exact, but small


@pytest.mark.parametrize("scheme", ORT_SCHEMES, ids=ORT_IDS)
def test_gather_block_quantized_equals_dequantized_rows(scheme):
    rng = np.random.default_rng(5)
    table = rng.standard_normal((50, 64)).astype(np.float32)
    qt, data = gather_block_quantized_inputs(table, scheme)
    nodes, inits, out = ort_ops.gather_block_quantized("/model/embed_tokens", "ids", data, scheme)
    ids = np.array([[0, 7, 49], [7, 7, 1]], np.int64)
    y = _session(nodes, inits, {"ids": ids}, out)
    np.testing.assert_array_equal(y, dequantize(qt)[ids])
    # the data bytes are the MatMulNBits B bytes (a tied lm_head can share them)
    np.testing.assert_array_equal(data["data"].reshape(qt.packed.shape), qt.packed)


# ---------------------------------------------------------------- MoE: EMO routing, independent numpy

H, I, E_ROUTED, K = 64, 32, 6, 3


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _experts(rng, n):
    g = [rng.standard_normal((I, H)).astype(np.float32) * 0.3 for _ in range(n)]
    u = [rng.standard_normal((I, H)).astype(np.float32) * 0.3 for _ in range(n)]
    d = [rng.standard_normal((H, I)).astype(np.float32) * 0.3 for _ in range(n)]
    return g, u, d


def emo_reference(x, router, gates, ups, downs, mode, k, forced=(), norm_topk=False):
    """Per token, straight from the EMO definition (float64)."""
    x = x.astype(np.float64)
    out = np.zeros_like(x)
    n = len(gates)
    for t in range(x.shape[0]):
        logits = router.astype(np.float64) @ x[t]
        chosen: dict[int, float] = {}
        if mode == "shared":  # the shared expert is the last; its own 1-logit softmax is exactly 1
            lr = logits[: n - 1]
            p = np.exp(lr - lr.max()); p /= p.sum()
            for e in np.argsort(-p, kind="stable")[: k - 1]:
                chosen[int(e)] = p[e]
            chosen[n - 1] = 1.0
        else:
            p = np.exp(logits - logits.max()); p /= p.sum()
            for e in forced:
                chosen[e] = p[e]
            rest = [int(e) for e in np.argsort(-p, kind="stable") if e not in forced]
            for e in rest[: k - len(forced)]:
                chosen[e] = p[e]
            if norm_topk:
                s = sum(chosen.values())
                chosen = {e: w / s for e, w in chosen.items()}
        for e, w in chosen.items():
            h = _silu(gates[e] @ x[t]) * (ups[e] @ x[t])
            out[t] += w * (downs[e] @ h)
    return out


def _dequant_experts(qts):
    g, u, d = [], [], []
    for fc1, fc2 in qts:
        w1 = dequantize(fc1)
        g.append(w1[0::2]); u.append(w1[1::2]); d.append(dequantize(fc2))
    return g, u, d


def _moe_graph(x, router, qw, mode, k, forced=(), with_weights=True, acc=0, normalize=0):
    p = "/model/layers.3/moe"
    nodes = [helper.make_node("MatMul", ["x", f"{p}/router.weight_T"], [f"{p}/router/logits"], name=f"{p}/router/MatMul")]
    inits = [numpy_helper.from_array(np.ascontiguousarray(router.T), f"{p}/router.weight_T")]
    n2, i2, scores, weights = ort_ops.emo_routing(p, f"{p}/router/logits", mode, len(qw.fc1_weights), forced)
    n3, i3, out = ort_ops.qmoe(p, "x", scores, weights if with_weights else None, qw, k, acc, normalize)
    assert n3[0].name == "/model/layers.3/moe/QMoE"
    return _session(nodes + n2 + n3, inits + i2 + i3, {"x": x}, out)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, True), QuantScheme(4, 32, False),
                                    QuantScheme(4, 32, True, rounding="search")], ids=["sym", "asym", "search"])
def test_qmoe_emo_shared_expert_routing(scheme):
    """EMO: softmax over routed logits, top-(k-1) with raw probabilities + shared expert (last) with weight 1."""
    rng = np.random.default_rng(6)
    g, u, d = _experts(rng, E_ROUTED + 1)
    qw, qts = pack_qmoe(g, u, d, scheme)
    router = rng.standard_normal((E_ROUTED + 1, H)).astype(np.float32) * 0.1  # flat: raw vs renorm differ
    x = rng.standard_normal((5, H)).astype(np.float32)
    y = _moe_graph(x, router, qw, "shared", K)
    ref = emo_reference(x, router, *_dequant_experts(qts), "shared", K)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # accuracy_level 4 (the speed choice): int8 activations, ~1 % relative error
    y4 = _moe_graph(x, router, qw, "shared", K, acc=4)
    assert np.linalg.norm(y4 - ref) / np.linalg.norm(ref) < 3e-2


def test_qmoe_int8_emo_shared_routing():
    """8-bit QMoE always runs int8 activations on CPU: same routing, ~1 % error."""
    rng = np.random.default_rng(7)
    g, u, d = _experts(rng, E_ROUTED + 1)
    qw, qts = pack_qmoe(g, u, d, QuantScheme(8, 32, False))
    router = rng.standard_normal((E_ROUTED + 1, H)).astype(np.float32) * 0.1
    x = rng.standard_normal((4, H)).astype(np.float32)
    y = _moe_graph(x, router, qw, "shared", K)
    ref = emo_reference(x, router, *_dequant_experts(qts), "shared", K)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 3e-2


@pytest.mark.parametrize("mode,forced,norm", [("topk", (), False), ("topk", (), True), ("always", (1, 4), False)])
def test_qmoe_other_routing_variants(mode, forced, norm):
    rng = np.random.default_rng(8)
    n = 7
    g, u, d = _experts(rng, n)
    qw, qts = pack_qmoe(g, u, d, QuantScheme(4, 32, True))
    router = rng.standard_normal((n, H)).astype(np.float32) * 0.1
    x = rng.standard_normal((5, H)).astype(np.float32)
    # norm_topk_prob: no router_weights; QMoE's softmax of the top-k logits is the renormalised top-k softmax
    y = _moe_graph(x, router, qw, mode, 4, forced, with_weights=not norm, normalize=int(norm))
    ref = emo_reference(x, router, *_dequant_experts(qts), "topk" if mode == "topk" else "always", 4, forced, norm)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_qmoe_without_router_weights_ignores_normalize_flag():
    """The documented trap: normalize_routing_weights=0 still softmaxes only the top-k (renormalised)."""
    rng = np.random.default_rng(9)
    n = 7
    g, u, d = _experts(rng, n)
    qw, qts = pack_qmoe(g, u, d, QuantScheme(4, 32, True))
    router = rng.standard_normal((n, H)).astype(np.float32) * 0.05  # flat routing: top-3 mass well below 1
    x = rng.standard_normal((3, H)).astype(np.float32)
    y = _moe_graph(x, router, qw, "topk", 3, with_weights=False, normalize=0)
    deq = _dequant_experts(qts)
    renorm = emo_reference(x, router, *deq, "topk", 3, norm_topk=True)
    raw = emo_reference(x, router, *deq, "topk", 3, norm_topk=False)
    np.testing.assert_allclose(y, renorm, rtol=0, atol=1e-5 * np.abs(renorm).max())
    assert np.linalg.norm(y - raw) > 0.2 * np.linalg.norm(raw)


def test_float_moe_emo_shared_routing():
    """Float MoE honours normalize_routing_weights=0 (softmax over ALL router_probs): routed experts with k-1,
    shared expert as a separate dense MLP added after."""
    rng = np.random.default_rng(10)
    g, u, d = _experts(rng, E_ROUTED + 1)
    router = rng.standard_normal((E_ROUTED + 1, H)).astype(np.float32) * 0.1
    x = rng.standard_normal((4, H)).astype(np.float32)
    p = "/model/layers.0/moe"
    fc1 = np.stack([np.stack([gi, ui], 1).reshape(2 * I, H) for gi, ui in zip(g[:-1], u[:-1])])
    fc2 = np.stack(d[:-1])
    nodes = [helper.make_node("MatMul", ["x", "rT"], ["logits"])]
    inits = [numpy_helper.from_array(np.ascontiguousarray(router[:-1].T), "rT")]  # routed logits only
    n2, i2, moe_out = ort_ops.float_moe(p, "x", "logits", fc1, fc2, K - 1)
    # shared expert: down(silu(gate x) * up x)
    for nm, w in (("sg", g[-1]), ("su", u[-1]), ("sd", d[-1])):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), nm))
    nodes += n2 + [
        helper.make_node("MatMul", ["x", "sg"], ["hg"]), helper.make_node("MatMul", ["x", "su"], ["hu"]),
        helper.make_node("Sigmoid", ["hg"], ["sig"]), helper.make_node("Mul", ["hg", "sig"], ["act"]),
        helper.make_node("Mul", ["act", "hu"], ["hh"]), helper.make_node("MatMul", ["hh", "sd"], ["sh"]),
        helper.make_node("Add", [moe_out, "sh"], ["y"])]
    y = _session(nodes, inits + i2, {"x": x}, "y")
    ref = emo_reference(x, router, g, u, d, "shared", K)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


# ---------------------------------------------------------------- layouts: block sizes and float16 scales

@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_qmoe_layouts_with_fp32_activations(block, sym, scale_dtype):
    """QMoE takes float16 scales (its T2) with float32 input and any power-of-two block: exact (acc 0) against
    EMO's routing over the dequantized experts (dequantize applies the stored float16 scales)."""
    global H, I
    rng = np.random.default_rng(11)
    old = H, I
    H, I = 256, 128
    try:
        g, u, d = _experts(rng, E_ROUTED + 1)
        qw, qts = pack_qmoe(g, u, d, QuantScheme(4, block, sym, scale_dtype))
        assert qw.fc1_scales.dtype == np.dtype(scale_dtype)
        router = rng.standard_normal((E_ROUTED + 1, H)).astype(np.float32) * 0.1
        x = rng.standard_normal((4, H)).astype(np.float32)
        y = _moe_graph(x, router, qw, "shared", K)
        ref = emo_reference(x, router, *_dequant_experts(qts), "shared", K)
    finally:
        H, I = old
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_matmulnbits_scales_must_match_the_activations():
    """Why the MatMulNBits parts keep float32 scales (targets.FP16_SCALE_COMPONENTS): onnxruntime binds its scales
    to the type of A, so float16 scales with float32 activations do not load."""
    qt = quantize_blockwise(np.ones((16, 64), np.float32), QuantScheme(4, 32, True, "float16"))
    nodes, inits, out = ort_ops.matmul_nbits("/t", "x", qt, 0)
    with pytest.raises(Exception, match="T1"):
        _session(nodes, inits, {"x": np.ones((1, 64), np.float32)}, out)


def test_gather_block_quantized_fp16_scales_returns_fp16_rows():
    """GatherBlockQuantized returns rows in its scales' dtype: float16 scales give float16(dequantize(W)[ids])
    (the exporter Casts them to float32)."""
    rng = np.random.default_rng(12)
    scheme = QuantScheme(4, 32, False, "float16")
    qt, data = gather_block_quantized_inputs(rng.standard_normal((40, 64)).astype(np.float32), scheme)
    nodes, inits, out = ort_ops.gather_block_quantized("/e", "ids", data, scheme)
    ids = np.array([[3, 39, 0]], np.int64)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT16, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, dequantize(qt)[ids].astype(np.float16))


# ---------------------------------------------------------------- GroupQueryAttention and the KV cache dtype

def _gqa(t_io, t_cache, extra_inputs=(), **attrs):
    nh, kvh, hd = 4, 2, 64
    f = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}
    ins = [helper.make_tensor_value_info(n, t_io, [1, "S", w]) for n, w in (("q", nh * hd), ("k", kvh * hd),
                                                                           ("v", kvh * hd))]
    ins += [helper.make_tensor_value_info(n, t_cache, [1, kvh, "P", hd]) for n in ("pk", "pv")]
    ins += [helper.make_tensor_value_info("sl", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("tl", TensorProto.INT32, []),
            helper.make_tensor_value_info("cos", t_io, [64, hd // 2]),
            helper.make_tensor_value_info("sin", t_io, [64, hd // 2])]
    ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in extra_inputs]
    names = ["q", "k", "v", "pk", "pv", "sl", "tl", "cos", "sin"] + (["", "", ""] + list(extra_inputs)
                                                                    if extra_inputs else [])
    node = helper.make_node("GroupQueryAttention", names, ["o", "prk", "prv"], domain="com.microsoft", num_heads=nh,
                            kv_num_heads=kvh, do_rotary=1, **attrs)
    outs = [helper.make_tensor_value_info("o", t_io, None), helper.make_tensor_value_info("prk", t_cache, None),
            helper.make_tensor_value_info("prv", t_cache, None)]
    m = helper.make_model(helper.make_graph([node], "g", ins, outs),
                          opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 11
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    del f
    return lambda **feed: sess.run(None, feed)


def _gqa_feed(rng, past: int, dt=np.float32):
    ang = rng.standard_normal((64, 32))
    return dict(q=rng.standard_normal((1, 1, 256)).astype(dt), k=rng.standard_normal((1, 1, 128)).astype(dt),
                v=rng.standard_normal((1, 1, 128)).astype(dt), sl=np.array([past], np.int32),
                tl=np.array(past + 1, np.int32), cos=np.cos(ang).astype(dt), sin=np.sin(ang).astype(dt))


def test_gqa_fp16_cache_what_the_exporter_emits():
    """The exporter's fp16-KV attention (Cast q/k/v to fp16, GQA all in fp16, Cast back) against fp32 GQA on
    the same inputs: fp16 rounding only; present keeps the past rows bit for bit."""
    rng = np.random.default_rng(13)
    feed = _gqa_feed(rng, 40)
    pk, pv = (rng.standard_normal((1, 2, 40, 64)).astype(np.float16) for _ in range(2))
    ref = _gqa(TensorProto.FLOAT, TensorProto.FLOAT)(**feed, pk=pk.astype(np.float32), pv=pv.astype(np.float32))
    half = _gqa(TensorProto.FLOAT16, TensorProto.FLOAT16)(**{k: (v.astype(np.float16) if v.dtype == np.float32 else v)
                                                            for k, v in feed.items()}, pk=pk, pv=pv)
    assert half[1].dtype == np.float16 and np.array_equal(half[1][:, :, :40], pk)
    np.testing.assert_allclose(half[0].astype(np.float32), ref[0], rtol=0, atol=5e-3 * np.abs(ref[0]).max())
    np.testing.assert_allclose(half[1][:, :, 40:].astype(np.float32), ref[1][:, :, 40:], rtol=2e-3, atol=2e-3)


def test_gqa_cpu_runs_mixed_and_int8_caches_natively():
    """What onnxruntime 1.32's CPU GroupQueryAttention accepts (pinned, not used by default): fp32 q/k/v with an
    fp16 cache (exactly fp32 attention over the fp16-rounded cache; slow: see bench/quant_layout.py kv --mixed),
    and an int8 cache with a static per-tensor scale (k_scale/v_scale inputs): codes rint(k_rotated / scale)."""
    rng = np.random.default_rng(14)
    feed = _gqa_feed(rng, 30)
    pk, pv = (rng.standard_normal((1, 2, 30, 64)).astype(np.float32) for _ in range(2))
    ref16 = _gqa(TensorProto.FLOAT, TensorProto.FLOAT)(**feed, pk=pk.astype(np.float16).astype(np.float32),
                                                       pv=pv.astype(np.float16).astype(np.float32))
    mixed = _gqa(TensorProto.FLOAT, TensorProto.FLOAT16)(**feed, pk=pk.astype(np.float16), pv=pv.astype(np.float16))
    np.testing.assert_array_equal(mixed[0], ref16[0])
    s = np.float32(0.03)
    q8 = lambda a: np.clip(np.rint(a / s), -127, 127).astype(np.int8)  # noqa: E731
    ref8 = _gqa(TensorProto.FLOAT, TensorProto.FLOAT)(**feed, pk=q8(pk) * s, pv=q8(pv) * s)
    run8 = _gqa(TensorProto.FLOAT, TensorProto.INT8, ("ks", "vs"), k_quant_type="PER_TENSOR",
                v_quant_type="PER_TENSOR", kv_cache_bit_width=8)
    got = run8(**feed, pk=q8(pk), pv=q8(pv), ks=np.array([s]), vs=np.array([s]))
    assert got[1].dtype == np.int8 and np.array_equal(got[1][:, :, :30], q8(pk))
    np.testing.assert_array_equal(got[1][:, :, 30:], q8(ref8[1][:, :, 30:]))
    # the output is attention over the dequantized present (new row included), computed here in float64
    pos, hd = 30, 64
    c, si = feed["cos"][pos].astype(np.float64), feed["sin"][pos].astype(np.float64)
    q = feed["q"][0, 0].astype(np.float64).reshape(4, hd)
    q = q * np.concatenate([c, c]) + np.concatenate([-q[:, 32:], q[:, :32]], 1) * np.concatenate([si, si])
    keys, vals = got[1][0].astype(np.float64) * s, got[2][0].astype(np.float64) * s  # [kv, 31, hd]
    want = []
    for h in range(4):
        a = keys[h // 2] @ q[h] / np.sqrt(hd)
        w = np.exp(a - a.max())
        want.append((w / w.sum()) @ vals[h // 2])
    np.testing.assert_allclose(got[0][0, 0], np.concatenate(want), rtol=0, atol=1e-5)
