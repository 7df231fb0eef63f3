"""Which onnxruntime operator scheme should the exporter use for EMO's MoE layers?  (issue 4, part 4)

Builds each candidate at real width (hidden 2048, expert intermediate 1024, 32 routed experts + 1 shared,
top-8 = 7 routed + shared, EMO routing: softmax over routed logits, raw top-7 probabilities, shared weight 1),
16 chained layers  x <- x + MoE(LayerNorm(x)), runs it in onnxruntime with 2 threads for one token (decode)
and a 64-token prefill, and prints one table plus the conclusion. Not a test; ~2-3 min on 2 cores.

    python bench/moe_ops.py [--quick]

Expert weights are random codes / random floats: the kernels' work does not depend on the values (numerical
equality to EMO's definition is pinned by tests/export/test_quant.py on the same emitters). Quantized weights use
4 distinct weight sets cycled over the 16 layers (>= 4 x 30 MB touched between reuses, so a 32 MB L3 cannot
hold them); fp32 weights use one set (one layer alone touches 192 MB).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from exporters import ort_ops  # noqa: E402
from emo_edge.quant import QMoEWeights, QuantizedTensor, QuantScheme  # noqa: E402

H, I, E_ROUTED, K = 2048, 1024, 32, 8
E = E_ROUTED + 1
LAYERS, SETS = 16, 4
BS = 32


def _t(name, arr):
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def rand_q(rng, n, k, bits, lead=()):
    """Random packed codes [*lead, n, k*bits/8] and scales [*lead, n, k/BS] of ~unit gain."""
    codes = rng.integers(0, 256, size=lead + (n, k * bits // 8), dtype=np.uint8)
    std = 4.6 if bits == 4 else 74.0
    scales = np.full(lead + (n, k // BS), 1.0 / (std * np.sqrt(k)), np.float32)
    scales *= rng.uniform(0.5, 1.5, scales.shape).astype(np.float32)
    return codes, scales


def randn(rng, shape, fan_in):
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(fan_in ** -0.5)


def q_bytes_per_expert(bits):
    w = 3 * H * I * bits // 8
    return w + 3 * H * I // BS * 4  # + fp32 scales


# ---------------------------------------------------------------- per-layer builders
# Each returns (nodes, inits) computing  f"{p}/out" = MoE(xn) given xn and the routing tensors.

def layer_qmoe(p, xn, scores, weights, qw, acc):
    return ort_ops.qmoe(p, xn, scores, weights, qw, K, acc)


def _swiglu_weighted(p, h1, w_sel, n_exp):
    """h1 [T, n_exp*2I] (per expert interleaved gate/up) * weights [T, n_exp] -> [T, n_exp*I]."""
    nodes = [
        helper.make_node("Reshape", [h1, f"{p}/shape_g"], [f"{p}/h4"]),
        helper.make_node("Split", [f"{p}/h4"], [f"{p}/g", f"{p}/u"], axis=-1, num_outputs=2),
        helper.make_node("Sigmoid", [f"{p}/g"], [f"{p}/sg"]),
        helper.make_node("Mul", [f"{p}/g", f"{p}/sg"], [f"{p}/silu"]),
        helper.make_node("Mul", [f"{p}/silu", f"{p}/u"], [f"{p}/act"]),  # [T, n, I, 1]
        helper.make_node("Unsqueeze", [w_sel, f"{p}/axes23"], [f"{p}/w4"]),  # [T, n, 1, 1]
        helper.make_node("Mul", [f"{p}/act", f"{p}/w4"], [f"{p}/actw"]),
        helper.make_node("Reshape", [f"{p}/actw", f"{p}/shape_flat"], [f"{p}/hflat"]),
    ]
    inits = [_t(f"{p}/shape_g", np.array([0, n_exp, I, 2], np.int64)),
             _t(f"{p}/axes23", np.array([2, 3], np.int64)),
             _t(f"{p}/shape_flat", np.array([0, n_exp * I], np.int64))]
    return nodes, inits


def layer_mnb(p, xn, weights, fc1, fc2, experts, acc):
    """Two MatMulNBits over the concatenation of `experts` (fc1 [n*2I, H], fc2 [H, n*I] packed)."""
    n = len(experts)
    nodes = [helper.make_node("Gather", [weights, f"{p}/sel"], [f"{p}/wsel"], axis=1)]
    inits = [_t(f"{p}/sel", np.array(experts, np.int64))]
    sch = QuantScheme(4, BS, True)
    q1 = QuantizedTensor(fc1[0].reshape(n * 2 * I, H // BS, -1), fc1[1], None, (n * 2 * I, H), sch)
    q2 = QuantizedTensor(fc2[0].reshape(H, n * I // BS, -1), fc2[1], None, (H, n * I), sch)
    n1, i1, h1 = ort_ops.matmul_nbits(f"{p}/fc1", xn, q1, acc)
    n2, i2 = _swiglu_weighted(p, h1, f"{p}/wsel", n)
    n3, i3, out = ort_ops.matmul_nbits(f"{p}/fc2", f"{p}/hflat", q2, acc)
    return nodes + n1 + n2 + n3, inits + i1 + i2 + i3, out


def layer_fp32_dense(p, xn, weights, w1, w2, experts):
    """fp32 MatMul over the concatenation of `experts`: w1 [H, n*2I], w2 [n*I, H]."""
    n = len(experts)
    nodes = [helper.make_node("Gather", [weights, f"{p}/sel"], [f"{p}/wsel"], axis=1),
             helper.make_node("MatMul", [xn, w1], [f"{p}/h1"])]
    inits = [_t(f"{p}/sel", np.array(experts, np.int64))]
    n2, i2 = _swiglu_weighted(p, f"{p}/h1", f"{p}/wsel", n)
    nodes += n2 + [helper.make_node("MatMul", [f"{p}/hflat", w2], [f"{p}/out"])]
    return nodes, inits + i2, f"{p}/out"


def layer_float_moe(p, xn, logits, fc1, fc2, sw1, sw2):
    """Float MoE over the 32 routed experts (k=7; the op's full softmax = EMO's) + dense fp32 shared MLP."""
    out = f"{p}/MoE/output_0"
    nodes = [helper.make_node("MoE", [xn, logits, fc1, "", fc2], [out], name=f"{p}/MoE", domain="com.microsoft",
                              k=K - 1, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                              activation_beta=0.0, normalize_routing_weights=0)]
    inits = []
    n2, i2 = _swiglu_weighted(f"{p}/shared", f"{p}/sh1", f"{p}/one_w", 1)
    nodes += [helper.make_node("MatMul", [xn, sw1], [f"{p}/sh1"])] + n2 + [
        helper.make_node("MatMul", [f"{p}/shared/hflat", sw2], [f"{p}/sh2"]),
        helper.make_node("Add", [out, f"{p}/sh2"], [f"{p}/out"])]
    # weight 1 for the shared expert, shaped [T, 1]
    nodes.insert(0, helper.make_node("ReduceMax", [logits, f"{p}/ax1"], [f"{p}/lm"], keepdims=1))
    nodes.insert(1, helper.make_node("Mul", [f"{p}/lm", f"{p}/zero"], [f"{p}/lz"]))
    nodes.insert(2, helper.make_node("Add", [f"{p}/lz", f"{p}/onef"], [f"{p}/one_w"]))
    inits += i2 + [_t(f"{p}/ax1", np.array([1], np.int64)), _t(f"{p}/zero", np.array(0, np.float32)),
                   _t(f"{p}/onef", np.array(1, np.float32))]
    return nodes, inits, f"{p}/out"


# ---------------------------------------------------------------- whole models

def build(scheme, rng):
    """-> (ModelProto bytes, weight bytes touched per layer at T=1, bytes per layer at T=64, description)."""
    nodes, inits = [], []
    ones = "/model/ln_scale"
    inits.append(_t(ones, np.ones(H, np.float32)))
    kind = scheme["kind"]
    n_logits = E_ROUTED if kind == "moe" else E  # float MoE takes the routed logits only (shared is dense)
    routers = [_t(f"/model/router_set{s}", rng.standard_normal((H, n_logits)).astype(np.float32) * 0.02)
               for s in range(SETS)]
    inits += routers
    kind, bits, acc = scheme["kind"], scheme.get("bits", 4), scheme.get("acc", 0)
    if kind == "qmoe":
        sets = []
        for s in range(SETS):
            w1, s1 = rand_q(rng, 2 * I, H, bits, (E,))
            w2, s2 = rand_q(rng, H, I, bits, (E,))
            sets.append(QMoEWeights(w1, s1, None, w2, s2, None, H, I, QuantScheme(bits, BS, True)))
        per_exp = q_bytes_per_expert(bits)
        touched, touched64 = K * per_exp, E * per_exp
    elif kind == "mnb":
        experts = list(range(E)) if scheme["experts"] == "all" else list(range(K - 1)) + [E - 1]
        n = len(experts)
        sets = [(rand_q(rng, n * 2 * I, H, 4), rand_q(rng, H, n * I, 4)) for _ in range(SETS)]
        touched = touched64 = n * q_bytes_per_expert(4)
    elif kind == "fp32":
        experts = list(range(K - 1)) + [E - 1]
        n = len(experts)
        inits += [_t("/model/w1", randn(rng, (H, n * 2 * I), H)),
                  _t("/model/w2", randn(rng, (n * I, H), I))]
        touched = touched64 = n * 3 * H * I * 4
    elif kind == "moe":
        fc1 = rng.standard_normal((E_ROUTED, 2 * I, H), dtype=np.float32) * np.float32(H ** -0.5)
        fc2 = rng.standard_normal((E_ROUTED, H, I), dtype=np.float32) * np.float32(I ** -0.5)
        inits += [_t("/model/fc1", fc1), _t("/model/fc2", fc2),
                  _t("/model/sw1", randn(rng, (H, 2 * I), H)),
                  _t("/model/sw2", randn(rng, (I, H), I))]
        del fc1, fc2
        touched, touched64 = K * 3 * H * I * 4, E * 3 * H * I * 4
    x = "x"
    for layer in range(LAYERS):
        p = f"/model/layers.{layer}/moe"
        s = layer % SETS
        xn = f"{p}/ln"
        nodes.append(helper.make_node("LayerNormalization", [x, ones], [xn], axis=-1))
        logits = f"{p}/logits"
        nodes.append(helper.make_node("MatMul", [xn, routers[s].name], [logits]))
        rn, ri = [], []
        if kind != "moe":  # EMO weights (routed softmax, shared = 1) + selection scores, as the exporter emits
            rn, ri, scores, weights = ort_ops.emo_routing(p, logits, "shared", E)
        if kind == "moe":
            ln, li, out = layer_float_moe(p, xn, logits, "/model/fc1", "/model/fc2", "/model/sw1", "/model/sw2")
        elif kind == "qmoe":
            # initializers named once per weight set (emitted with the set's prefix), node renamed per layer
            ln, li, _ = layer_qmoe(f"/model/set{s}", xn, scores, weights, sets[s], acc)
            li = li if layer < SETS else []
            out = f"{p}/QMoE/output_0"
            ln[0].name, ln[0].output[0] = f"{p}/QMoE", out
        elif kind == "mnb":
            key = f"/model/set{s}"
            ln, li, out = layer_mnb(p, xn, weights, *sets[s], experts, acc)
            for nd in ln:  # share the MatMulNBits initializers of a set across layers
                if nd.op_type == "MatMulNBits":
                    for j in (1, 2):
                        nd.input[j] = nd.input[j].replace(p, key)
            li = [t for t in li if not t.name.startswith(f"{p}/fc")] + (
                [t for t in li if t.name.startswith(f"{p}/fc")] if layer < SETS else [])
            for t in li:
                if t.name.startswith(f"{p}/fc"):
                    t.name = t.name.replace(p, key)
        else:
            ln, li, out = layer_fp32_dense(p, xn, weights, "/model/w1", "/model/w2", experts)
        nodes += rn + ln
        inits += ri + li
        nxt = f"/model/layers.{layer}/out"
        nodes.append(helper.make_node("Add", [x, out], [nxt]))
        x = nxt
    g = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["T", H])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString(), touched, touched64


SCHEMES = [
    dict(name="QMoE int4 bs32 acc4", kind="qmoe", bits=4, acc=4, exact=True,
         what="1 node/layer, 7 routed + shared, router_weights"),
    dict(name="QMoE int4 bs32 acc0", kind="qmoe", bits=4, acc=0, exact=True, what="same, fp32 activations"),
    dict(name="QMoE int8 bs32 acc4", kind="qmoe", bits=8, acc=4, exact=True, what="same, int8 weights"),
    dict(name="MatMulNBits int4 acc4 x8 fixed", kind="mnb", experts="fixed", acc=4, exact=False,
         what="8 FIXED experts (lower bound, no selection)"),
    dict(name="MatMulNBits int4 acc4 all 33", kind="mnb", experts="all", acc=4, exact=True,
         what="all 33 experts, unselected weight 0"),
    dict(name="float MoE fp32 + fp32 shared", kind="moe", exact=True, what="MoE k=7 over 32 + dense shared"),
    dict(name="fp32 MatMul x8 fixed", kind="fp32", exact=False, what="8 FIXED experts (lower bound)"),
]


def _run(sess, x):
    t0 = time.perf_counter()
    sess.run(None, {"x": x})
    return (time.perf_counter() - t0) / LAYERS * 1e3  # ms per layer


def paired(lead, sess, x, rounds, budget_s):
    """Alternate lead/candidate runs so both see the same background load (this machine is shared).
    -> (candidate ms samples, lead ms samples, per-round candidate/lead ratios)."""
    _run(lead, x)
    first = _run(sess, x)  # warm-up; also tells whether the candidate is very slow
    if first * LAYERS > budget_s * 1e3 / 2:
        rounds = 1
    a, b = [], []
    t_end = time.perf_counter() + budget_s
    for i in range(rounds):
        b.append(_run(lead, x))
        a.append(_run(sess, x))
        if time.perf_counter() > t_end and i >= 2:
            break
    return a, b, [x_ / y_ for x_, y_ in zip(a, b)]


def make_session(sch, rng):
    model, touched, touched64 = build(sch, rng)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]), touched, touched64


def main():
    global SETS
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    ap.add_argument("--only", default="", help="comma-separated scheme indices (0, the lead, always runs)")
    ap.add_argument("--sets", type=int, default=4, help="distinct quantized weight sets cycled over layers")
    args = ap.parse_args()
    SETS = args.sets
    rng = np.random.default_rng(0)
    t_start = time.perf_counter()
    picked = [SCHEMES[int(i)] for i in args.only.split(",") if int(i)] if args.only else SCHEMES[1:]
    lead_sch = SCHEMES[0]
    lead, lt1, lt64 = make_session(lead_sch, rng)
    x1 = rng.standard_normal((1, H)).astype(np.float32)
    x64 = rng.standard_normal((64, H)).astype(np.float32)
    r1, r64 = (6, 1) if args.quick else (25, 3)
    rows, lead1, lead64 = [], [], []
    for sch in [lead_sch] + picked:
        t0 = time.perf_counter()
        load = os.getloadavg()[0]
        if sch is lead_sch:
            sess, t1, t64 = lead, lt1, lt64
        else:
            sess, t1, t64 = make_session(sch, rng)
        t_build = time.perf_counter() - t0
        a1, b1, q1 = paired(lead, sess, x1, r1, 6)
        a64, b64, q64 = paired(lead, sess, x64, r64, 8)
        finite = bool(np.all(np.isfinite(sess.run(None, {"x": x1})[0])))
        if sess is not lead:
            del sess
        lead1 += b1
        lead64 += b64
        ms1 = float(np.median(a1))
        rows.append(dict(sch, ms1=ms1, min1=float(np.min(a1)), ms64=float(np.median(a64)),
                         q1=float(np.median(q1)), q64=float(np.median(q64)), gbs=t1 / ms1 / 1e6,
                         mb=t1 / 2**20, load=load, finite=finite))
        print(f"  [{time.perf_counter() - t_start:5.0f}s] {sch['name']}: build {t_build:.1f}s, "
              f"T=1 {ms1:.2f} ms/layer ({len(a1)} paired runs), T=64 {rows[-1]['ms64']:.2f} ({len(a64)})",
              file=sys.stderr)
    # the lead's own row: pooled over all its paired runs
    rows[0].update(ms1=float(np.median(lead1)), min1=float(np.min(lead1)), ms64=float(np.median(lead64)),
                   q1=1.0, q64=1.0, gbs=lt1 / float(np.median(lead1)) / 1e6)
    print(f"\nonnxruntime {ort.__version__}, 2 threads; hidden {H}, inter {I}, {E_ROUTED} routed + 1 shared, "
          f"top-{K} (7 routed + shared); {LAYERS} chained layers; median ms per layer. 'x lead' = median of "
          f"per-round ratios to '{lead_sch['name']}' run alternately with it (robust to background load).")
    hdr = (f"{'scheme':31} {'MB/tok':>6} {'T=1 ms':>7} {'(min)':>6} {'GB/s':>5} {'x lead':>6} {'T=64 ms':>8} "
           f"{'ms/tok':>6} {'x lead':>6} {'load':>4}  computes")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['name']:31} {r['mb']:6.1f} {r['ms1']:7.2f} {r['min1']:6.2f} {r['gbs']:5.1f} {r['q1']:6.2f} "
              f"{r['ms64']:8.2f} {r['ms64'] / 64:6.3f} {r['q64']:6.2f} {r['load']:4.1f}  {r['what']}"
              + ("" if r["finite"] else "  [non-finite output]"))
    exact = [r for r in rows if r["exact"]]

    def pick(key):  # another scheme must beat the lead by > 5 % (the noise of paired runs on a shared box)
        best = min(exact, key=lambda r: r[key])
        return best if best[key] < 0.95 else rows[0]
    win, win64 = pick("q1"), pick("q64")
    print(f"\nCONCLUSION: the exporter should emit '{win['name']}' per MoE layer for decode "
          f"({win['q1']:.2f}x the lead, {win['ms1']:.2f} ms/layer here); prefill (64 tokens): '{win64['name']}' "
          f"({win64['q64']:.2f}x). Lower bounds (FIXED experts) are not valid schemes. MB/tok = weights (+fp32 "
          f"scales) one decode token touches; GB/s from the median; load = 1-min load average before the scheme "
          f"(2 cores); total {time.perf_counter() - t_start:.0f}s")

if __name__ == "__main__":
    main()
