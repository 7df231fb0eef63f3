"""Emitters for the quantized onnxruntime contrib nodes the exporter uses, with deterministic names.

Every function returns `(nodes, initializers, output_name)`; node and initializer names are built from the
caller's `prefix` (e.g. "/model/layers.3/moe"), so the same model always yields the same graph. The
numbers behind the byte layouts live in emo_edge/quant.py; the semantics are pinned by tests/export/test_quant.py.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from emo_edge.quant import QMoEWeights, QuantizedTensor, QuantScheme, gather_block_quantized_attrs, matmulnbits_attrs

MS = "com.microsoft"
# Selection score given to experts that must always be chosen (shared / always-active). Only the order of
# router_probs matters to QMoE when router_weights is given; any finite value above every logit works.
# 3e4 stays finite in float16 activations (max 65504) and far above any real router logit.
FORCE_SCORE = 3.0e4

Emitted = tuple[list[NodeProto], list[TensorProto], str]


def _init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def matmul_nbits(prefix: str, x: str, qt: QuantizedTensor, accuracy_level: int = 4) -> Emitted:
    """y = x @ W^T with W block-quantized.

        x [.., K] --> MatMulNBits(B, scales[, zero_points]) --> y [.., N]
                      name: {prefix}/MatMulNBits
    """
    ins = [x, f"{prefix}/MatMulNBits.B", f"{prefix}/MatMulNBits.scales"]
    inits = [_init(ins[1], qt.packed), _init(ins[2], qt.scales)]
    if qt.zero_points is not None:
        ins.append(f"{prefix}/MatMulNBits.zero_points")
        inits.append(_init(ins[3], qt.zero_points))
    out = f"{prefix}/MatMulNBits/output_0"
    node = helper.make_node("MatMulNBits", ins, [out], name=f"{prefix}/MatMulNBits", domain=MS,
                            **matmulnbits_attrs(qt, accuracy_level))
    return [node], inits, out


def gather_block_quantized(prefix: str, ids: str, data: dict[str, np.ndarray], scheme: QuantScheme) -> Emitted:
    """Embedding lookup from a block-quantized table.

        ids [B, S] int64 --> GatherBlockQuantized(data uint8 [V, H*b/8], scales [V, H/bs][, zp]) --> [B, S, H]
                             name: {prefix}/GatherBlockQuantized
    """
    ins = [f"{prefix}/GatherBlockQuantized.data", ids, f"{prefix}/GatherBlockQuantized.scales"]
    inits = [_init(ins[0], data["data"]), _init(ins[2], data["scales"])]
    if "zero_points" in data:
        ins.append(f"{prefix}/GatherBlockQuantized.zero_points")
        inits.append(_init(ins[3], data["zero_points"]))
    out = f"{prefix}/GatherBlockQuantized/output_0"
    node = helper.make_node("GatherBlockQuantized", ins, [out], name=f"{prefix}/GatherBlockQuantized",
                            domain=MS, **gather_block_quantized_attrs(scheme))
    return [node], inits, out


def emo_routing(prefix: str, logits: str, mode: str, n_experts: int, forced: tuple[int, ...] = (),
                n_shared: int = 1) -> tuple[list[NodeProto], list[TensorProto], str, str]:
    """Turn router logits [T, E] (2-D, all E experts of the bundle) into QMoE's (router_probs, router_weights).

    mode "shared" (EMO: the LAST n_shared experts are shared; emo_edge.model.reference.route):
        logits --Split[E-s, s]--> routed --Softmax--------------+--Concat--> weights [T, E]
                                  shared --Softmax--------------+            (s=1: shared weight exactly 1)
                                  routed -----------------------+--Concat--> scores  [T, E]
                                  shared --Add(3e4)-------------+            (shared always selected)
    mode "always" (softmax over all logits; experts in `forced` always chosen with their own probability):
        logits --Softmax--------------------> weights [T, E]
        logits --Add(3e4 at forced)---------> scores  [T, E]
    mode "topk" (plain top-k of softmax(all), not renormalised):
        logits --Softmax--> weights;  scores = logits
    (norm_topk_prob=True needs no weights at all: QMoE without router_weights softmaxes the top-k logits,
    which is exactly the renormalised top-k softmax.)
    Returns (nodes, inits, scores_name, weights_name).
    """
    p = f"{prefix}/router"
    nodes: list[NodeProto] = []
    inits: list[TensorProto] = []
    if mode == "shared":
        s = n_shared
        r, sh = f"{p}/Split/output_0", f"{p}/Split/output_1"
        inits += [_init(f"{p}/split_sizes", np.array([n_experts - s, s], np.int64)),
                  _init(f"{p}/force_score", np.array(FORCE_SCORE, np.float32))]
        weights, scores = f"{p}/Concat_weights/output_0", f"{p}/Concat_scores/output_0"
        nodes += [
            helper.make_node("Split", [logits, f"{p}/split_sizes"], [r, sh], name=f"{p}/Split", axis=-1),
            helper.make_node("Softmax", [r], [f"{p}/Softmax_routed/output_0"], name=f"{p}/Softmax_routed", axis=-1),
            helper.make_node("Softmax", [sh], [f"{p}/Softmax_shared/output_0"], name=f"{p}/Softmax_shared", axis=-1),
            helper.make_node("Concat", [f"{p}/Softmax_routed/output_0", f"{p}/Softmax_shared/output_0"], [weights],
                             name=f"{p}/Concat_weights", axis=-1),
            helper.make_node("Add", [sh, f"{p}/force_score"], [f"{p}/Add_force/output_0"], name=f"{p}/Add_force"),
            helper.make_node("Concat", [r, f"{p}/Add_force/output_0"], [scores], name=f"{p}/Concat_scores", axis=-1),
        ]
        return nodes, inits, scores, weights
    soft = f"{p}/Softmax/output_0"
    nodes.append(helper.make_node("Softmax", [logits], [soft], name=f"{p}/Softmax", axis=-1))
    if mode == "always":
        bias = np.zeros(n_experts, np.float32)
        bias[list(forced)] = FORCE_SCORE
        inits.append(_init(f"{p}/force_bias", bias))
        weights, scores = soft, f"{p}/Add_force/output_0"
        nodes.append(helper.make_node("Add", [logits, f"{p}/force_bias"], [scores], name=f"{p}/Add_force"))
    elif mode == "topk":
        weights, scores = soft, logits
    else:
        raise ValueError(f"unknown routing mode {mode!r}")
    return nodes, inits, scores, weights


def qmoe(prefix: str, x: str, scores: str, weights: str | None, qw: QMoEWeights, k: int,
         accuracy_level: int = 4, normalize_routing_weights: int = 0) -> Emitted:
    """The whole routed+shared expert block of one layer as one QMoE node.

        x [T, H] ------------------------------+
        scores  [T, E] (selection only) -------+--> QMoE(fc1 gate/up interleaved, fc2 down) --> y [T, H]
        weights [T, E] (mixing, gathered) -----+    name: {prefix}/QMoE
    silu(gate) * up exactly: activation_type='swiglu', swiglu_fusion=1, activation_alpha=1, activation_beta=0,
    no swiglu_limit. weights=None -> no router_weights input (QMoE softmaxes the top-k scores).
    """
    n = f"{prefix}/QMoE"
    inits = [_init(f"{n}.fc1_weights", qw.fc1_weights), _init(f"{n}.fc1_scales", qw.fc1_scales),
             _init(f"{n}.fc2_weights", qw.fc2_weights), _init(f"{n}.fc2_scales", qw.fc2_scales)]
    z1 = z2 = ""
    if qw.fc1_zero_points is not None:
        z1, z2 = f"{n}.fc1_zero_points", f"{n}.fc2_zero_points"
        inits += [_init(z1, qw.fc1_zero_points), _init(z2, qw.fc2_zero_points)]
    ins = [x, scores, f"{n}.fc1_weights", f"{n}.fc1_scales", "", f"{n}.fc2_weights", f"{n}.fc2_scales", "",
           "", "", "", z1, z2, "", weights or ""]
    while ins and ins[-1] == "":
        ins.pop()
    out = f"{n}/output_0"
    node = helper.make_node(
        "QMoE", ins, [out], name=n, domain=MS, k=k, activation_type="swiglu", swiglu_fusion=1,
        activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=normalize_routing_weights,
        use_sparse_mixer=0, quant_type="int", expert_weight_bits=qw.scheme.bits,
        block_size=qw.scheme.block_size, accuracy_level=accuracy_level, weights_prepacked=0)
    return [node], inits, out


def float_moe(prefix: str, x: str, logits: str, fc1: np.ndarray, fc2: np.ndarray, k: int,
              normalize_routing_weights: int = 0) -> Emitted:
    """Float MoE over routed experts (the op softmaxes ALL router_probs, then takes top-k of that).

        x [T, H], logits [T, E] --> MoE(fc1 [E, 2I, H] interleaved gate/up, fc2 [E, H, I]) --> y [T, H]
                                    name: {prefix}/MoE
    For EMO "shared": feed the routed logits with k-1 and add the shared expert as a separate dense MLP.
    """
    n = f"{prefix}/MoE"
    inits = [_init(f"{n}.fc1_weights", fc1), _init(f"{n}.fc2_weights", fc2)]
    out = f"{n}/output_0"
    node = helper.make_node(
        "MoE", [x, logits, f"{n}.fc1_weights", "", f"{n}.fc2_weights"], [out], name=n, domain=MS, k=k,
        activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
        normalize_routing_weights=normalize_routing_weights, use_sparse_mixer=0)
    return [node], inits, out
