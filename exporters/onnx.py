"""The EMO decoder as one ONNX graph (prefill and decode, KV cache in/out), emitted layer by layer.

Weights are streamed: every initializer is written to `model.onnx.data` the moment it is emitted (external data,
offsets aligned to 64 bytes), so only the layer being emitted is held in memory. Node names are deterministic
(`/model/layers.3/moe/MoE`).

Graph I/O (onnxruntime-genai / optimum names):
    input_ids [B, S] int64, attention_mask [B, P+S] int64, position_ids [B, S] int64,
    past_key_values.{i}.key / .value [B, kv, P, hd]  ->  logits [B, S, V], present.{i}.key / .value [B, kv, P+S, hd]
    logits_to_keep [1] int64, optional (an initializer of default 0 = every position; n > 0: logits of the last n
    positions only, [B, n, V]: what the engine's prefill asks for)
The KV cache (past_key_values.* / present.*) is float32, float16 or int8 (`Precision.kv_cache_dtype`, from the
plan): 'tensor(float)', 'tensor(float16)' or 'tensor(int8)' as onnxruntime reports the graph inputs; loaders take
it from there. An int8 cache holds rint(x / scale) per (kv head, dim) with the static scales of the graph's
`/model/layers.{i}/attn/k_scale` / `v_scale` initializers (emo_edge/export/kv_scales.py).

Files: exporters/onnx_graph.py (external data, Precision, the node/initializer builder and its linear/SwiGLU
blocks), exporters/onnx_attention.py (attention, mixed into DecoderBuilder), this module (the decoder: embedding,
norms, MoE, head, graph I/O).

Ops: SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (RMSNorm with fused residual add),
GroupQueryAttention (com.microsoft) with rotary from cos/sin caches (any rope type: the caches are precomputed,
YaRN's attention factor folded in), MatMul (fp32) or MatMulNBits (int4/int8) for projections, MoE (fp32) or
QMoE (int4/int8) for the routed experts, shared / always-active experts as dense SwiGLU MLPs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters import ort_ops
from emo_edge.plan.sizing import GQA_HEAD_MULTIPLE
from emo_edge.quant import QMoEWeights, QuantScheme, interleave_gate_up, quantize_blockwise

from .onnx_attention import AttentionMixin
from .onnx_graph import (  # noqa: F401  (re-exported: the exporter's API)
    ALIGN, DEFAULT_LAYOUT, INLINE_MAX, MS, OPSET, ExportWriteError, ExternalData, Graph, Precision,
)

LOGITS_TO_KEEP = "logits_to_keep"


# ---------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LayerWeights:
    """One decoder layer's tensors as numpy (float32), already restricted to the bundle's experts.

    routed: list of (gate, up, down) in the bundle's numbering 0..r-1 (source ids in `routed_ids`);
    implicit: (gate, up, down) of the shared / always-active experts, in `implicit_ids` order."""
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray
    attn_bias: tuple | None
    routing: str  # topk | shared | always_active | dense
    router_routed: np.ndarray | None = None  # (r, H)
    router_implicit: np.ndarray | None = None  # (n_impl, H)
    routed_k: int = 0
    routed: Callable | None = None  # () -> iterator of (gate, up, down), one expert at a time
    n_routed: int = 0
    implicit: list | None = None
    dense: tuple | None = None
    dense_bias: tuple | None = None


@dataclass
class ModelDims:
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    norm_topk: bool
    context: int


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    ins = ["input_ids", "attention_mask", "position_ids"]
    outs = ["logits"]
    for i in range(n_layers):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


def shared_expert_folds(routing: str, n_shared: int, routed_k: int, quantized: bool, norm_topk: bool) -> bool:
    """Whether a layer's shared expert can run inside its QMoE (DecoderBuilder fold_shared): EMO "shared"
    routing with one shared expert (weight exactly 1), routed experts, quantized experts (QMoE), and
    un-renormalised top-k weights (QMoE's own softmax of the top-k, norm_topk, would mix the shared expert
    into the normalisation)."""
    return routing == "shared" and n_shared == 1 and routed_k > 0 and quantized and not norm_topk


class DecoderBuilder(AttentionMixin):
    """Emits the decoder graph. Call `embedding`, then `layer` for each layer in order, then `head`, `save`."""

    def __init__(self, out_dir: Path, dims: ModelDims, prec: Precision, cos: np.ndarray, sin: np.ndarray,
                 write: Callable | None = None, fold_shared: bool = False):
        """fold_shared: put EMO's one shared expert into the layer's QMoE as its last expert, always selected
        with weight 1 (see `moe`); off for the swappable exporter, whose pool shards hold routed experts only."""
        self.dir, self.d, self.prec = Path(out_dir), dims, prec
        self.fold_shared = fold_shared
        self.gqa = dims.head_dim % GQA_HEAD_MULTIPLE == 0  # else attention from standard ops
        self.data = ExternalData(self.dir / "model.onnx.data", write)
        self.g = Graph(self.data, prec)
        # [context, hd/2]; GroupQueryAttention runs in the KV dtype and takes its caches in it
        rope = np.float16 if prec.kv_cache_dtype == "float16" and self.gqa else np.float32
        self.cos = self.g.init("cos_cache", cos.astype(rope))
        self.sin = self.g.init("sin_cache", sin.astype(rope))
        self._common_inputs()
        self.h: str | None = None  # residual stream so far
        self.pending: str | None = None  # last sublayer output not yet added to the residual

    # ---- inputs -----------------------------------------------------------------------------------------
    def _common_inputs(self) -> None:
        """seqlens_k = sum(attention_mask) - 1 (int32), total_sequence_length = attention_mask.shape[1] (int32)

            attention_mask --ReduceSum(1)--> Sub(1) --Cast(int32)--> seqlens_k
            attention_mask --Shape--> Gather(1) --Cast(int32)--> total_sequence_length
        """
        g, p = self.g, "/model/attn_mask_reformat"
        one = g.init(f"{p}/one", np.array(1, np.int64))
        axes = g.init(f"{p}/axes", np.array([1], np.int64))
        s = g.one("ReduceSum", ["attention_mask", axes], f"{p}/ReduceSum", keepdims=0)
        s = g.one("Sub", [s, one], f"{p}/Sub")
        self.seqlens_k = g.one("Cast", [s], f"{p}/Cast_seqlens", to=TensorProto.INT32)
        shp = g.one("Shape", ["attention_mask"], f"{p}/Shape")
        t = g.one("Gather", [shp, one], f"{p}/Gather", axis=0)
        self.total_len = g.one("Cast", [t], f"{p}/Cast_total", to=TensorProto.INT32)

    # ---- embedding ------------------------------------------------------------------------------------
    def embedding(self, rows: Callable[[int, int], np.ndarray], chunk: int = 8192) -> None:
        """input_ids [B, S] --Gather | GatherBlockQuantized--> h [B, S, H]   (table written in row chunks)"""
        d, g, p = self.d, self.g, "/model/embed_tokens"
        scheme = self.prec.scheme("embedding")
        spans = [(a, min(d.vocab, a + chunk)) for a in range(0, d.vocab, chunk)]
        if scheme is None:
            dt = np.float16 if self.prec.embedding == "fp16" else np.float32
            g.inits.append(self.data.add_chunks(f"{p}.weight", dt, (d.vocab, d.hidden),
                                                (rows(a, b).astype(dt) for a, b in spans)))
            self.h = g.one("Gather", [f"{p}.weight", "input_ids"], f"{p}/Gather", axis=0)
            if dt == np.float16:
                self.h = g.one("Cast", [self.h], f"{p}/Cast", to=TensorProto.FLOAT)
            return
        name = f"{p}/GatherBlockQuantized"
        scales: list[np.ndarray] = []
        zps: list[np.ndarray] = []

        def data_chunks():
            for a, b in spans:
                qt = quantize_blockwise(rows(a, b), scheme)
                scales.append(qt.scales)
                zps.append(qt.zero_points)
                yield qt.packed.reshape(b - a, -1)

        blob = d.hidden * scheme.bits // 8
        g.inits.append(self.data.add_chunks(f"{name}.data", np.uint8, (d.vocab, blob), data_chunks()))
        g.inits.append(self.data.add(f"{name}.scales", np.concatenate(scales)))
        ins = [f"{name}.data", "input_ids", f"{name}.scales"]
        if not scheme.symmetric:
            g.inits.append(self.data.add(f"{name}.zero_points", np.concatenate(zps)))
            ins.append(f"{name}.zero_points")
        self.h = g.one("GatherBlockQuantized", ins, name, domain=MS,
                       bits=scheme.bits, block_size=scheme.block_size, gather_axis=0, quantize_axis=1)
        if scheme.scale_dtype != "float32":  # the op returns rows in the scales' dtype
            self.h = g.one("Cast", [self.h], f"{name}/Cast", to=TensorProto.FLOAT)

    # ---- norms ---------------------------------------------------------------------------------------
    def _norm(self, prefix: str, weight: np.ndarray) -> str:
        """RMSNorm with the pending residual add fused in.

            first:  h ---------------------------> RMSNormalization (ONNX 23) --> x
            later:  pending, h --> SkipSimplifiedLayerNormalization --> x, h' = h + pending
        """
        g = self.g
        w = g.init(f"{prefix}.weight", weight.astype(np.float32))
        if self.pending is None:
            # ONNX-23 RMSNormalization: onnx.checker knows it (the contrib SimplifiedLayerNormalization sits in
            # the default domain without a schema there); ORT runs it with the same fused kernel
            return g.one("RMSNormalization", [self.h, w], f"{prefix}/RMSNormalization", axis=-1,
                         epsilon=self.d.eps, stash_type=1)
        name = f"{prefix}/SkipSimplifiedLayerNormalization"
        outs = [f"{name}/output_0", "", "", f"{name}/output_3"]
        g.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [self.pending, self.h, w], outs,
                                        name=name, domain=MS, epsilon=self.d.eps))
        self.h, self.pending = outs[3], None
        return outs[0]

    # ---- MoE ------------------------------------------------------------------------------------------
    def moe(self, i: int, x3: str, lw: LayerWeights) -> str:
        """Static pool-masked EMO routing; only the selected experts run.

            x [B,S,H] --Reshape--> x2 [N,H] --MatMul(router rows of kept routed experts)--> routed_logits [N,r]
                                           --MatMul(router rows of implicit experts)----> implicit_logits
            topk/shared:    routed_logits --MoE|QMoE(k=routed_k)--> y
            always_active:  Softmax(concat(all logits)) = p; MoE(routed_logits) * sum(p[:, :r]) (QMoE: weights=p[:, :r])
            implicit:       shared: weight 1 (one) or softmax(implicit_logits); always_active: p[:, r+j]
                            each a dense SwiGLU MLP, added to y
            fold_shared:    one shared expert, quantized: the QMoE's last expert instead (`_routed_with_shared`)
        """
        g, d, p = self.g, self.d, f"/model/layers.{i}/moe"
        shape_h = g.init(f"{p}/shape_2d", np.array([-1, d.hidden], np.int64))
        x = g.one("Reshape", [x3, shape_h], f"{p}/Reshape_in")
        r = lw.n_routed
        routed_logits = g.linear(f"{p}/router", x, lw.router_routed, None, "router")
        impl_logits = None
        need_impl = lw.routing == "always_active" or (lw.implicit is not None and len(lw.implicit) > 1)
        if need_impl and lw.router_implicit is not None:
            impl_logits = g.linear(f"{p}/router_implicit", x, lw.router_implicit, None, "router")
        full_p = None
        if lw.routing == "always_active":
            cat = g.one("Concat", [routed_logits, impl_logits], f"{p}/router/Concat", axis=-1)
            full_p = g.one("Softmax", [cat], f"{p}/router/Softmax_all", axis=-1)
        y = None
        impl = lw.implicit or []
        if self._folds(lw):
            y, impl = self._routed_with_shared(p, x, routed_logits, lw), []
        elif lw.routed_k > 0:
            y = self._routed(p, x, routed_logits, full_p, lw)
        shared_p = None
        if lw.routing == "shared" and len(impl) > 1:
            shared_p = g.one("Softmax", [impl_logits], f"{p}/router_implicit/Softmax", axis=-1)
        for j, (gate, up, down) in enumerate(impl):
            e = g.swiglu_mlp(f"{p}/implicit.{j}", x, gate, up, down, "experts")
            wj = None
            if lw.routing == "always_active":
                wj = self._column(f"{p}/implicit.{j}/weight", full_p, r + j)
            elif shared_p is not None:
                wj = self._column(f"{p}/implicit.{j}/weight", shared_p, j)
            if wj is not None:
                e = g.one("Mul", [e, wj], f"{p}/implicit.{j}/Mul_weight")
            y = e if y is None else g.one("Add", [y, e], f"{p}/implicit.{j}/Add")
        shp = g.one("Shape", [x3], f"{p}/Shape")
        return g.one("Reshape", [y, shp], f"{p}/Reshape_out")

    def _folds(self, lw: LayerWeights) -> bool:
        return self.fold_shared and shared_expert_folds(lw.routing, len(lw.implicit or []), lw.routed_k,
                                                        self.prec.scheme("experts") is not None, self.d.norm_topk)

    def _routed_with_shared(self, p: str, x: str, logits: str, lw: LayerWeights) -> str:
        """One QMoE over the routed experts + the shared one (last), k = routed_k + 1:

            routed_logits [N, r] --Pad(+1 column of FORCE_SCORE)--------> scores  [N, r+1] (shared always chosen)
                                 --Softmax--Pad(+1 column of 1.0)-------> weights [N, r+1] (shared weight 1)
        Same sum as the routed QMoE + a dense SwiGLU MLP; at decode (one token) the kernel spreads k + 1 = 8
        experts evenly over the threads instead of 7 experts + 3 MatMulNBits and 5 small nodes after it."""
        g = self.g
        pads = g.init(f"{p}/router/shared_pads", np.array([0, 0, 0, 1], np.int64))
        force = g.init(f"{p}/router/shared_score", np.array(ort_ops.FORCE_SCORE, np.float32))
        one = g.init(f"{p}/router/shared_weight", np.array(1.0, np.float32))
        scores = g.one("Pad", [logits, pads, force], f"{p}/router/Pad_scores", mode="constant")
        soft = g.one("Softmax", [logits], f"{p}/router/Softmax", axis=-1)
        weights = g.one("Pad", [soft, pads, one], f"{p}/router/Pad_weights", mode="constant")
        qw = self._pack_qmoe(lw, self.prec.scheme("experts"), extra=lw.implicit)
        return g.emitted(ort_ops.qmoe(p, x, scores, weights, qw, lw.routed_k + 1, self.prec.accuracy_level, 0))

    def _column(self, prefix: str, probs: str, col: int) -> str:
        """probs [N, E] --Slice(col:col+1)--> [N, 1]"""
        g = self.g
        a = g.init(f"{prefix}/start", np.array([col], np.int64))
        b = g.init(f"{prefix}/end", np.array([col + 1], np.int64))
        ax = g.init(f"{prefix}/axis", np.array([1], np.int64))
        return g.one("Slice", [probs, a, b, ax], f"{prefix}/Slice")

    def _routed(self, p: str, x: str, logits: str, full_p: str | None, lw: LayerWeights) -> str:
        """The routed experts in one MoE (fp32) or QMoE (int) node; see `moe`."""
        g, d = self.g, self.d
        scheme = self.prec.scheme("experts")
        r = lw.n_routed
        routed_p = None
        if full_p is not None:
            a = g.init(f"{p}/router/routed_start", np.array([0], np.int64))
            b = g.init(f"{p}/router/routed_end", np.array([r], np.int64))
            ax = g.init(f"{p}/router/routed_axis", np.array([1], np.int64))
            routed_p = g.one("Slice", [full_p, a, b, ax], f"{p}/router/Slice_routed")
        if scheme is None:
            fc1 = np.empty((r, 2 * d.inter, d.hidden), np.float32)
            fc2 = np.empty((r, d.hidden, d.inter), np.float32)
            for e, (gate, up, down) in enumerate(lw.routed()):
                fc1[e] = interleave_gate_up(gate, up)
                fc2[e] = down
            if self.prec.experts == "fp16":
                y = self._float_moe_fp16(p, x, logits, fc1, fc2, lw.routed_k)
            else:
                y = g.emitted(ort_ops.float_moe(p, x, logits, fc1, fc2, lw.routed_k,
                                                normalize_routing_weights=int(d.norm_topk)))
            del fc1, fc2
            if routed_p is not None:  # the op softmaxed the routed logits only: rescale by their full mass
                mass = g.one("ReduceSum", [routed_p, g.init(f"{p}/router/mass_axes", np.array([1], np.int64))],
                             f"{p}/router/ReduceSum_mass", keepdims=1)
                y = g.one("Mul", [y, mass], f"{p}/Mul_mass")
            return y
        qw = self._pack_qmoe(lw, scheme)
        if d.norm_topk:
            weights = None  # QMoE's softmax of the top-k logits == renormalised top-k
        elif routed_p is not None:
            weights = routed_p
        else:
            weights = g.one("Softmax", [logits], f"{p}/router/Softmax", axis=-1)
        return g.emitted(ort_ops.qmoe(p, x, logits, weights, qw, lw.routed_k, self.prec.accuracy_level, 0))

    def _float_moe_fp16(self, p: str, x: str, logits: str, fc1: np.ndarray, fc2: np.ndarray, k: int) -> str:
        """MoE with fp16-stored expert weights Cast to fp32 (same attributes as ort_ops.float_moe)."""
        g, n = self.g, f"{p}/MoE"
        w1 = g.weight(f"{n}.fc1_weights", fc1, "fp16")
        w2 = g.weight(f"{n}.fc2_weights", fc2, "fp16")
        return g.one("MoE", [x, logits, w1, "", w2], n, domain=MS, k=k, activation_type="swiglu",
                     swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                     normalize_routing_weights=int(self.d.norm_topk), use_sparse_mixer=0)

    def _pack_qmoe(self, lw: LayerWeights, scheme: QuantScheme, extra: list | None = None) -> QMoEWeights:
        """Quantize expert by expert into preallocated QMoE arrays (never all experts in float at once);
        `extra` ((gate, up, down) triples) follow the routed experts."""
        d, r = self.d, lw.n_routed + len(extra or [])
        for name, dim in (("hidden", d.hidden), ("intermediate", d.inter)):
            if dim % scheme.block_size:
                raise ValueError(f"QMoE needs {name} size {dim} divisible by block_size {scheme.block_size}")
        b1, b2 = d.hidden * scheme.bits // 8, d.inter * scheme.bits // 8
        fc1 = np.empty((r, 2 * d.inter, b1), np.uint8)
        fc2 = np.empty((r, d.hidden, b2), np.uint8)
        sdt = np.float16 if scheme.scale_dtype == "float16" else np.float32
        s1 = np.empty((r, 2 * d.inter, d.hidden // scheme.block_size), sdt)
        s2 = np.empty((r, d.hidden, d.inter // scheme.block_size), sdt)
        z1 = z2 = None
        for e, (gate, up, down) in enumerate(itertools.chain(lw.routed(), extra or [])):
            a = quantize_blockwise(interleave_gate_up(gate, up), scheme)
            b = quantize_blockwise(down, scheme)
            fc1[e], fc2[e], s1[e], s2[e] = a.packed.reshape(2 * d.inter, -1), b.packed.reshape(d.hidden, -1), \
                a.scales, b.scales
            if not scheme.symmetric:
                if z1 is None:
                    z1 = np.empty((r,) + a.zero_points.shape, np.uint8)
                    z2 = np.empty((r,) + b.zero_points.shape, np.uint8)
                z1[e], z2[e] = a.zero_points, b.zero_points
        return QMoEWeights(fc1, s1, z1, fc2, s2, z2, d.hidden, d.inter, scheme)

    # ---- layers ---------------------------------------------------------------------------------------
    def layer(self, i: int, lw: LayerWeights) -> None:
        """h --norm--> attention --(+h)--norm--> MoE | dense MLP --> pending (added at the next norm)"""
        p = f"/model/layers.{i}"
        x = self._norm(f"{p}/input_layernorm", lw.attn_norm)
        self.pending = self.attention(i, x, lw)
        x = self._norm(f"{p}/post_attention_layernorm", lw.ffn_norm)
        if lw.routing == "dense":
            self.pending = self.g.swiglu_mlp(f"{p}/mlp", x, *lw.dense, "experts", lw.dense_bias)
        else:
            self.pending = self.moe(i, x, lw)

    def head(self, final_norm: np.ndarray, rows: Callable[[int, int], np.ndarray], chunk: int = 8192) -> None:
        """h --final norm--> x [B,S,H] --Reshape--> [N,H] --Gemm(transB) | MatMulNBits--> --Reshape--> logits"""
        g, d, p = self.g, self.d, "/model/lm_head"
        x = self._keep_last(self._norm("/model/norm", final_norm))
        scheme = self.prec.scheme("lm_head", matmul=True)
        spans = [(a, min(d.vocab, a + chunk)) for a in range(0, d.vocab, chunk)]
        if scheme is None:
            shape_h = g.init(f"{p}/shape_2d", np.array([-1, d.hidden], np.int64))
            x2 = g.one("Reshape", [x, shape_h], f"{p}/Reshape_in")
            dt = np.float16 if self.prec.lm_head == "fp16" else np.float32
            g.inits.append(self.data.add_chunks(f"{p}.weight", dt, (d.vocab, d.hidden),
                                                (rows(a, b).astype(dt) for a, b in spans)))
            w = f"{p}.weight"
            if dt == np.float16:
                w = g.one("Cast", [w], f"{p}.weight/Cast", to=TensorProto.FLOAT)
            y2 = g.one("Gemm", [x2, w], f"{p}/Gemm", transB=1)
            shp = g.one("Shape", [x], f"{p}/Shape")
            start = g.init(f"{p}/zero", np.array([0], np.int64))
            end = g.init(f"{p}/two", np.array([2], np.int64))
            bs = g.one("Slice", [shp, start, end], f"{p}/Slice")
            vshape = g.init(f"{p}/vocab", np.array([d.vocab], np.int64))
            out_shape = g.one("Concat", [bs, vshape], f"{p}/Concat", axis=0)
            g.nodes.append(helper.make_node("Reshape", [y2, out_shape], ["logits"], name=f"{p}/Reshape_out"))
            return
        name = f"{p}/MatMulNBits"
        scales: list[np.ndarray] = []
        zps: list[np.ndarray] = []
        nb = -(-d.hidden // scheme.block_size)

        def chunks():
            for a, b in spans:
                qt = quantize_blockwise(rows(a, b), scheme)
                scales.append(qt.scales)
                zps.append(qt.zero_points)
                yield qt.packed

        g.inits.append(self.data.add_chunks(f"{name}.B", np.uint8, (d.vocab, nb, scheme.blob_size), chunks()))
        g.inits.append(self.data.add(f"{name}.scales", np.concatenate(scales)))
        ins = [x, f"{name}.B", f"{name}.scales"]
        if not scheme.symmetric:
            g.inits.append(self.data.add(f"{name}.zero_points", np.concatenate(zps)))
            ins.append(f"{name}.zero_points")
        g.nodes.append(helper.make_node("MatMulNBits", ins, ["logits"], name=name,
                                        domain=MS, K=d.hidden, N=d.vocab, bits=scheme.bits,
                                        block_size=scheme.block_size, accuracy_level=self.prec.accuracy_level))

    def _keep_last(self, x: str) -> str:
        """Only the last `logits_to_keep` positions reach the lm_head (0, its default, keeps all):

            logits_to_keep [1] (graph input, default initializer 0) --Neg--> start
            x [B,S,H] --Slice(axis 1, start..end)--> [B,S',H]
        A prefill reads the last token's logits only, so neither the [S, vocab] logits nor their lm_head
        matmul are paid for the prompt; callers that feed nothing (onnxruntime-genai, optimum, verification)
        get every position as before."""
        g, p = self.g, "/model/logits_to_keep"
        g.init(LOGITS_TO_KEEP, np.array([0], np.int64))
        start = g.one("Neg", [LOGITS_TO_KEEP], f"{p}/Neg")
        end = g.init(f"{p}/end", np.array([np.iinfo(np.int64).max], np.int64))
        axes = g.init(f"{p}/axes", np.array([1], np.int64))
        return g.one("Slice", [x, start, end, axes], f"{p}/Slice")

    # ---- finish ---------------------------------------------------------------------------------------
    def save(self) -> Path:
        d = self.d
        self.data.close()
        ins, outs = io_names(d.layers)
        kv = lambda n: helper.make_tensor_value_info(n, self.prec.kv_type, ["batch_size", d.kv_heads, "past_sequence_length" if n.startswith("past") else "total_sequence_length", d.head_dim])  # noqa: E731,E501
        graph_in = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                    helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                  ["batch_size", "total_sequence_length"]),
                    helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
        graph_in += [kv(n) for n in ins[3:]]
        graph_in.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))  # overridable
        graph_out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                   ["batch_size", "logits_length", d.vocab])]
        graph_out += [kv(n) for n in outs[1:]]
        graph = helper.make_graph(self.g.nodes, "emo_decoder", graph_in, graph_out, self.g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="emo-edge")
        model.ir_version = 11
        path = self.dir / "model.onnx"
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        return path


def check(path: Path) -> None:
    """onnx.checker on the saved model (path form: works past 2 GB, reads the external data lazily)."""
    onnx.checker.check_model(str(path))
