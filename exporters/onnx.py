"""The EMO decoder as one ONNX graph (prefill and decode, KV cache in/out), emitted layer by layer.

Weights are streamed: every initializer is written to `model.onnx.data` the moment it is emitted (external data,
offsets aligned to 64 bytes), so only the layer being emitted is held in memory. Node names are deterministic
(`/model/layers.3/moe/MoE`).

Graph I/O (onnxruntime-genai / optimum names):
    input_ids [B, S] int64, attention_mask [B, P+S] int64, position_ids [B, S] int64,
    past_key_values.{i}.key / .value [B, kv, P, hd]  ->  logits [B, S, V], present.{i}.key / .value [B, kv, P+S, hd]

Ops: SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (RMSNorm with fused residual add),
GroupQueryAttention (com.microsoft) with rotary from cos/sin caches (any rope type: the caches are precomputed,
YaRN's attention factor folded in), MatMul (fp32) or MatMulNBits (int4/int8) for projections, MoE (fp32) or
QMoE (int4/int8) for the routed experts, shared / always-active experts as dense SwiGLU MLPs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from emo_edge import ort_ops
from emo_edge.quant import QMoEWeights, QuantScheme, interleave_gate_up, quantize_blockwise

MS = "com.microsoft"
OPSET = 23
ALIGN = 64
INLINE_MAX = 256  # bytes: smaller initializers stay inside model.onnx


class ExportWriteError(OSError):
    """Writing the external data file failed (disk full, ...)."""


# ---------------------------------------------------------------------------------------------------------
# external data, written as we go
# ---------------------------------------------------------------------------------------------------------
class ExternalData:
    """Appends tensor bytes to one file and hands back TensorProtos that point into it."""

    def __init__(self, path: Path, write: Callable | None = None):
        self.path = Path(path)
        self.location = self.path.name
        self.f = open(self.path, "wb")
        self.offset = 0
        self._write = write or (lambda f, b: f.write(b))

    def _put(self, data) -> None:
        self._write(self.f, data)
        self.offset += memoryview(data).nbytes

    def _align(self) -> None:
        pad = (-self.offset) % ALIGN
        if pad:
            self._put(b"\0" * pad)

    def _proto(self, name: str, dtype: np.dtype, shape: Sequence[int], offset: int, length: int) -> TensorProto:
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        t.dims.extend(int(d) for d in shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def add(self, name: str, arr: np.ndarray) -> TensorProto:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes <= INLINE_MAX:
            return numpy_helper.from_array(arr, name)
        self._align()
        start = self.offset
        self._put(arr.reshape(-1).view(np.uint8).data)
        return self._proto(name, arr.dtype, arr.shape, start, arr.nbytes)

    def add_proto(self, t: TensorProto) -> TensorProto:
        """Move an in-memory TensorProto's raw bytes to the file."""
        if len(t.raw_data) <= INLINE_MAX:
            return t
        arr = numpy_helper.to_array(t)
        return self.add(t.name, arr)

    def add_chunks(self, name: str, dtype, shape: Sequence[int], chunks) -> TensorProto:
        """A tensor written from row chunks (each a contiguous array of `dtype`), never whole in memory."""
        self._align()
        start = self.offset
        for c in chunks:
            c = np.ascontiguousarray(c, dtype=dtype)
            self._put(c.reshape(-1).view(np.uint8).data)
        length = self.offset - start
        expect = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if length != expect:
            raise ValueError(f"{name}: wrote {length} bytes, shape {list(shape)} needs {expect}")
        return self._proto(name, dtype, shape, start, length)

    def close(self) -> None:
        if not self.f.closed:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()


# ---------------------------------------------------------------------------------------------------------
# graph builder
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Precision:
    """Per-component precision: fp32 | fp16 | int8 | int4 (routers, norms, caches always fp32)."""
    attention: str = "fp32"
    experts: str = "fp32"
    embedding: str = "fp32"
    lm_head: str = "fp32"
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = True
    scale_dtype: str = "float32"

    def scheme(self, prec: str) -> QuantScheme | None:
        if prec in ("fp32", "fp16"):
            return None
        return QuantScheme(bits=4 if prec == "int4" else 8, block_size=self.block_size, symmetric=self.symmetric,
                           scale_dtype=self.scale_dtype)


@dataclass
class Graph:
    data: ExternalData
    prec: Precision
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    value_infos: list = field(default_factory=list)

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(self.data.add(name, arr))
        return name

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        return self.node(op, inputs, name, 1, domain, **attrs)[0]

    def weight(self, name: str, arr: np.ndarray, prec: str) -> str:
        """A float weight: fp32 as is; fp16 stored half and Cast to fp32 (ORT folds the Cast at load).

            name (fp16) --Cast(to float)--> name/Cast/output_0
        """
        if prec != "fp16":
            return self.init(name, arr.astype(np.float32, copy=False))
        self.init(name, arr.astype(np.float16))
        return self.one("Cast", [name], f"{name}/Cast", to=TensorProto.FLOAT)

    def emitted(self, em) -> str:
        """Take (nodes, inits, out) from emo_edge.ort_ops, streaming the inits to the data file."""
        nodes, inits, out = em
        self.nodes += nodes
        self.inits += [self.data.add_proto(t) for t in inits]
        return out

    # ---- building blocks ------------------------------------------------------------------------------
    def linear(self, prefix: str, x: str, w: np.ndarray, bias: np.ndarray | None, prec: str) -> str:
        """y = x @ W^T (+ b)

            x [.., K] --MatMul(W^T [K, N]) | MatMulNBits(W q)--> [.., N] --(Add b)--> y
        """
        scheme = self.prec.scheme(prec)
        if scheme is None:
            y = self.one("MatMul", [x, self.weight(f"{prefix}.weight_T", np.ascontiguousarray(w.T), prec)],
                         f"{prefix}/MatMul")
        else:
            y = self.emitted(ort_ops.matmul_nbits(prefix, x, quantize_blockwise(w, scheme), self.prec.accuracy_level))
        if bias is not None:
            y = self.one("Add", [y, self.init(f"{prefix}.bias", bias.astype(np.float32))], f"{prefix}/Add")
        return y

    def swiglu_mlp(self, prefix: str, x: str, gate, up, down, prec: str, biases=None) -> str:
        """down(silu(gate x + bg) * (up x + bu)) + bd

            x --gate_proj--> g --Sigmoid--> s --Mul(g)--> a --+
            x --up_proj----> u -------------------------------Mul--> down_proj --> y
        """
        bg, bu, bd = biases or (None, None, None)
        g = self.linear(f"{prefix}/gate_proj", x, gate, bg, prec)
        u = self.linear(f"{prefix}/up_proj", x, up, bu, prec)
        s = self.one("Sigmoid", [g], f"{prefix}/act/Sigmoid")
        a = self.one("Mul", [g, s], f"{prefix}/act/Mul")
        h = self.one("Mul", [a, u], f"{prefix}/Mul")
        return self.linear(f"{prefix}/down_proj", h, down, bd, prec)


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


class DecoderBuilder:
    """Emits the decoder graph. Call `embedding`, then `layer` for each layer in order, then `head`, `save`."""

    def __init__(self, out_dir: Path, dims: ModelDims, prec: Precision, cos: np.ndarray, sin: np.ndarray,
                 write: Callable | None = None):
        self.dir, self.d, self.prec = Path(out_dir), dims, prec
        self.data = ExternalData(self.dir / "model.onnx.data", write)
        self.g = Graph(self.data, prec)
        self.cos = self.g.init("cos_cache", cos.astype(np.float32))  # [context, hd/2]
        self.sin = self.g.init("sin_cache", sin.astype(np.float32))
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
        scheme = self.prec.scheme(self.prec.embedding)
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

        def data_chunks():
            for a, b in spans:
                qt = quantize_blockwise(rows(a, b), scheme)
                scales.append(qt.scales)
                yield qt.packed.reshape(b - a, -1)

        blob = d.hidden * scheme.bits // 8
        g.inits.append(self.data.add_chunks(f"{name}.data", np.uint8, (d.vocab, blob), data_chunks()))
        g.inits.append(self.data.add(f"{name}.scales", np.concatenate(scales)))
        self.h = g.one("GatherBlockQuantized", [f"{name}.data", "input_ids", f"{name}.scales"], name, domain=MS,
                       bits=scheme.bits, block_size=scheme.block_size, gather_axis=0, quantize_axis=1)

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

    # ---- attention ------------------------------------------------------------------------------------
    def attention(self, i: int, x: str, lw: LayerWeights) -> str:
        """x [B, S, H] --q/k/v_proj--> GroupQueryAttention(past kv, seqlens_k, rotary cos/sin) --o_proj--> y

            x --q_proj--> q --+
            x --k_proj--> k --+--> GQA(do_rotary=1) --> attn --o_proj--> y
            x --v_proj--> v --+        |--> present.{i}.key / present.{i}.value
        """
        g, d, p = self.g, self.d, f"/model/layers.{i}/attn"
        pr = self.prec.attention
        bq, bk, bv, bo = lw.attn_bias or (None,) * 4
        q = g.linear(f"{p}/q_proj", x, lw.q, bq, pr)
        k = g.linear(f"{p}/k_proj", x, lw.k, bk, pr)
        v = g.linear(f"{p}/v_proj", x, lw.v, bv, pr)
        if d.head_dim % 16:  # the CPU GroupQueryAttention kernel needs head_size % 16 == 0
            return g.linear(f"{p}/o_proj", self._attention_plain(i, p, q, k, v), lw.o, bo, pr)
        name = f"{p}/GroupQueryAttention"
        outs = [f"{name}/output_0", f"present.{i}.key", f"present.{i}.value"]
        g.nodes.append(helper.make_node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", self.seqlens_k, self.total_len,
             self.cos, self.sin],
            outs, name=name, domain=MS, num_heads=d.heads, kv_num_heads=d.kv_heads, do_rotary=1,
            rotary_interleaved=0, scale=float(d.head_dim ** -0.5)))
        return g.linear(f"{p}/o_proj", outs[0], lw.o, bo, pr)

    def _rope_tables(self) -> tuple[str, str]:
        """position_ids [B,S] --Gather(cos/sin cache)--> [B,S,hd/2] --Concat(x2)--> --Unsqueeze(1)--> [B,1,S,hd]"""
        if getattr(self, "_rope", None) is None:
            g, p = self.g, "/model/rotary"
            ax1 = g.init(f"{p}/axis1", np.array([1], np.int64))
            outs = []
            for nm, cache in (("cos", self.cos), ("sin", self.sin)):
                t = g.one("Gather", [cache, "position_ids"], f"{p}/Gather_{nm}", axis=0)
                t = g.one("Concat", [t, t], f"{p}/Concat_{nm}", axis=-1)
                outs.append(g.one("Unsqueeze", [t, ax1], f"{p}/Unsqueeze_{nm}"))
            # additive mask [B,1,S,T]: -inf where key position > query position or attention_mask == 0
            zero = g.init(f"{p}/zero", np.array(0, np.int64))
            one = g.init(f"{p}/one", np.array(1, np.int64))
            shp = g.one("Shape", ["attention_mask"], f"{p}/mask/Shape")
            tot = g.one("Gather", [shp, one], f"{p}/mask/Gather_total", axis=0)
            kpos = g.one("Range", [zero, tot, one], f"{p}/mask/Range")
            qpos = g.one("Unsqueeze", ["position_ids", g.init(f"{p}/mask/axis2", np.array([2], np.int64))],
                         f"{p}/mask/Unsqueeze_q")
            future = g.one("Greater", [kpos, qpos], f"{p}/mask/Greater")  # [B,S,T]
            am = g.one("Unsqueeze", ["attention_mask", ax1], f"{p}/mask/Unsqueeze_am")  # [B,1,T]
            pad = g.one("Equal", [am, zero], f"{p}/mask/Equal_pad")
            bad = g.one("Or", [future, pad], f"{p}/mask/Or")
            neg = g.init(f"{p}/mask/neg", np.array(-3.0e38, np.float32))
            fz = g.init(f"{p}/mask/fzero", np.array(0.0, np.float32))
            m = g.one("Where", [bad, neg, fz], f"{p}/mask/Where")
            outs.append(g.one("Unsqueeze", [m, ax1], f"{p}/mask/Unsqueeze"))
            self._rope = tuple(outs)
        return self._rope

    def _attention_plain(self, i: int, p: str, q: str, k: str, v: str) -> str:
        """Attention from standard ops (head sizes the GQA kernel refuses).

            q/k/v [B,S,n*hd] --Reshape,Transpose--> [B,n,S,hd]; q,k: x*cos + rotate_half(x)*sin
            k,v: Concat(past, new) on axis 2 --> present.{i}.*; GQA: Expand kv heads to q heads
            Softmax(q k^T * scale + mask) v --Transpose,Reshape--> [B,S,nh*hd]
        """
        g, d = self.g, self.d
        cos, sin, mask = self._rope_tables()
        half = d.head_dim // 2

        def heads(t: str, n: int, nm: str) -> str:
            sh = g.init(f"{p}/{nm}/shape", np.array([0, 0, n, d.head_dim], np.int64))
            r = g.one("Reshape", [t, sh], f"{p}/{nm}/Reshape")
            return g.one("Transpose", [r], f"{p}/{nm}/Transpose", perm=[0, 2, 1, 3])

        def rotary(t: str, nm: str) -> str:
            a, b = g.node("Split", [t, g.init(f"{p}/{nm}/rot/split", np.array([half, half], np.int64))],
                          f"{p}/{nm}/rot/Split", 2, axis=-1)
            nb = g.one("Neg", [b], f"{p}/{nm}/rot/Neg")
            rh = g.one("Concat", [nb, a], f"{p}/{nm}/rot/Concat", axis=-1)
            x1 = g.one("Mul", [t, cos], f"{p}/{nm}/rot/Mul_cos")
            x2 = g.one("Mul", [rh, sin], f"{p}/{nm}/rot/Mul_sin")
            return g.one("Add", [x1, x2], f"{p}/{nm}/rot/Add")

        qh = rotary(heads(q, d.heads, "q"), "q")
        kh = rotary(heads(k, d.kv_heads, "k"), "k")
        vh = heads(v, d.kv_heads, "v")
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.key", kh], [f"present.{i}.key"],
                                        name=f"{p}/k/Concat_past", axis=2))
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.value", vh], [f"present.{i}.value"],
                                        name=f"{p}/v/Concat_past", axis=2))
        kk, vv = f"present.{i}.key", f"present.{i}.value"
        rep = d.heads // d.kv_heads
        if rep > 1:
            ax2 = g.init(f"{p}/kv/axis2", np.array([2], np.int64))
            shp5 = g.init(f"{p}/kv/expand", np.array([1, 1, rep, 1, 1], np.int64))
            sh4 = g.init(f"{p}/kv/shape4", np.array([0, d.heads, -1, d.head_dim], np.int64))
            out = []
            for nm, t in (("k", kk), ("v", vv)):
                u = g.one("Unsqueeze", [t, ax2], f"{p}/{nm}/repeat/Unsqueeze")
                e = g.one("Expand", [u, shp5], f"{p}/{nm}/repeat/Expand")
                out.append(g.one("Reshape", [e, sh4], f"{p}/{nm}/repeat/Reshape"))
            kk, vv = out
        kt = g.one("Transpose", [kk], f"{p}/k/Transpose_T", perm=[0, 1, 3, 2])
        sc = g.one("MatMul", [qh, kt], f"{p}/scores/MatMul")
        sc = g.one("Mul", [sc, g.init(f"{p}/scores/scale", np.array(d.head_dim ** -0.5, np.float32))],
                   f"{p}/scores/Mul_scale")
        sc = g.one("Add", [sc, mask], f"{p}/scores/Add_mask")
        pr = g.one("Softmax", [sc], f"{p}/Softmax", axis=-1)
        o = g.one("MatMul", [pr, vv], f"{p}/out/MatMul")
        o = g.one("Transpose", [o], f"{p}/out/Transpose", perm=[0, 2, 1, 3])
        return g.one("Reshape", [o, g.init(f"{p}/out/shape", np.array([0, 0, -1], np.int64))], f"{p}/out/Reshape")

    # ---- MoE ------------------------------------------------------------------------------------------
    def moe(self, i: int, x3: str, lw: LayerWeights) -> str:
        """Static pool-masked EMO routing; only the selected experts run.

            x [B,S,H] --Reshape--> x2 [N,H] --MatMul(router rows of kept routed experts)--> routed_logits [N,r]
                                           --MatMul(router rows of implicit experts)----> implicit_logits
            topk/shared:    routed_logits --MoE|QMoE(k=routed_k)--> y
            always_active:  Softmax(concat(all logits)) = p; MoE(routed_logits) * sum(p[:, :r]) (QMoE: weights=p[:, :r])
            implicit:       shared: weight 1 (one) or softmax(implicit_logits); always_active: p[:, r+j]
                            each a dense SwiGLU MLP, added to y
        """
        g, d, p = self.g, self.d, f"/model/layers.{i}/moe"
        shape_h = g.init(f"{p}/shape_2d", np.array([-1, d.hidden], np.int64))
        x = g.one("Reshape", [x3, shape_h], f"{p}/Reshape_in")
        r = lw.n_routed
        routed_logits = g.linear(f"{p}/router", x, lw.router_routed, None, "fp32")
        impl_logits = None
        need_impl = lw.routing == "always_active" or (lw.implicit is not None and len(lw.implicit) > 1)
        if need_impl and lw.router_implicit is not None:
            impl_logits = g.linear(f"{p}/router_implicit", x, lw.router_implicit, None, "fp32")
        full_p = None
        if lw.routing == "always_active":
            cat = g.one("Concat", [routed_logits, impl_logits], f"{p}/router/Concat", axis=-1)
            full_p = g.one("Softmax", [cat], f"{p}/router/Softmax_all", axis=-1)
        y = None
        if lw.routed_k > 0:
            y = self._routed(p, x, routed_logits, full_p, lw)
        impl = lw.implicit or []
        shared_p = None
        if lw.routing == "shared" and len(impl) > 1:
            shared_p = g.one("Softmax", [impl_logits], f"{p}/router_implicit/Softmax", axis=-1)
        for j, (gate, up, down) in enumerate(impl):
            e = g.swiglu_mlp(f"{p}/implicit.{j}", x, gate, up, down, self.prec.experts)
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
        scheme = self.prec.scheme(self.prec.experts)
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

    def _pack_qmoe(self, lw: LayerWeights, scheme: QuantScheme) -> QMoEWeights:
        """Quantize expert by expert into preallocated QMoE arrays (never all experts in float at once)."""
        d, r = self.d, lw.n_routed
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
        for e, (gate, up, down) in enumerate(lw.routed()):
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
            self.pending = self.g.swiglu_mlp(f"{p}/mlp", x, *lw.dense, self.prec.experts, lw.dense_bias)
        else:
            self.pending = self.moe(i, x, lw)

    def head(self, final_norm: np.ndarray, rows: Callable[[int, int], np.ndarray], chunk: int = 8192) -> None:
        """h --final norm--> x [B,S,H] --Reshape--> [N,H] --Gemm(transB) | MatMulNBits--> --Reshape--> logits"""
        g, d, p = self.g, self.d, "/model/lm_head"
        x = self._norm("/model/norm", final_norm)
        scheme = self.prec.scheme(self.prec.lm_head)
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
        nb = -(-d.hidden // scheme.block_size)

        def chunks():
            for a, b in spans:
                qt = quantize_blockwise(rows(a, b), scheme)
                scales.append(qt.scales)
                yield qt.packed

        g.inits.append(self.data.add_chunks(f"{name}.B", np.uint8, (d.vocab, nb, scheme.blob_size), chunks()))
        g.inits.append(self.data.add(f"{name}.scales", np.concatenate(scales)))
        g.nodes.append(helper.make_node("MatMulNBits", [x, f"{name}.B", f"{name}.scales"], ["logits"], name=name,
                                        domain=MS, K=d.hidden, N=d.vocab, bits=scheme.bits,
                                        block_size=scheme.block_size, accuracy_level=self.prec.accuracy_level))

    # ---- finish ---------------------------------------------------------------------------------------
    def save(self) -> Path:
        d = self.d
        self.data.close()
        ins, outs = io_names(d.layers)
        kv = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch_size", d.kv_heads, "past_sequence_length" if n.startswith("past") else "total_sequence_length", d.head_dim])  # noqa: E731,E501
        graph_in = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                    helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                  ["batch_size", "total_sequence_length"]),
                    helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
        graph_in += [kv(n) for n in ins[3:]]
        graph_out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                   ["batch_size", "sequence_length", d.vocab])]
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
