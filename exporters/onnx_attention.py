"""Attention of the exported decoder: GroupQueryAttention (fp32, fp16 or int8 KV cache) or, for head sizes the
CPU kernel refuses, the same computation from standard ops. A mixin of exporters/onnx.py DecoderBuilder (it uses
the builder's graph `g`, dims `d`, precision `prec`, RoPE caches and attention-mask tensors)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from .onnx_graph import MS, stacked_bias


class AttentionMixin:
    # ---- attention ------------------------------------------------------------------------------------
    def attention(self, i: int, x: str, lw) -> str:  # lw: exporters.onnx.LayerWeights
        """x [B, S, H] --qkv_proj--> GroupQueryAttention(packed qkv, past kv, seqlens_k, rotary cos/sin) --o_proj--> y

            x --qkv_proj--> [q | k | v] --(Cast fp16)--> GQA(do_rotary=1) --(Cast fp32)--> attn --o_proj--> y
                                                             |--> present.{i}.key / present.{i}.value
            (the Casts only with a float16 KV cache: GQA then runs in fp16, cos/sin caches included; an int8
            cache takes fp32 q/k/v and the layer's static k_scale / v_scale). One projection node instead of
            three: `python bench/op_profile.py` showed the attention projections at 9.5 GB/s against the single
            lm_head MatMulNBits' 13.4, per-node dispatch at batch 1 being the difference.
        """
        g, d, p = self.g, self.d, f"/model/layers.{i}/attn"
        bq, bk, bv, bo = lw.attn_bias or (None,) * 4
        if not self.gqa:
            if self.prec.kv_cache_dtype == "int8":
                raise ValueError("an int8 KV cache needs GroupQueryAttention (head_dim % 16 == 0)")
            q = g.linear(f"{p}/q_proj", x, lw.q, bq, "attention")
            k = g.linear(f"{p}/k_proj", x, lw.k, bk, "attention")
            v = g.linear(f"{p}/v_proj", x, lw.v, bv, "attention")
            return g.linear(f"{p}/o_proj", self._attention_plain(i, p, q, k, v), lw.o, bo, "attention")
        # q, k and v in one projection (their rows stacked: each output row, and each quantization block along
        # the input, is the same as in three), which GroupQueryAttention takes packed
        bias = stacked_bias((bq, lw.q), (bk, lw.k), (bv, lw.v))
        qkv = g.linear(f"{p}/qkv_proj", x, np.concatenate([lw.q, lw.k, lw.v]), bias, "attention")
        half = self.prec.kv_cache_dtype == "float16"
        if half:  # onnxruntime 1.32's CPU GQA also takes fp32 q/k/v with an fp16 cache, but then converts the
            # whole cache to fp32 on every call (measured 20-35x slower per layer); all-fp16 runs at fp32's speed
            qkv = g.one("Cast", [qkv], f"{p}/qkv/Cast_fp16", to=TensorProto.FLOAT16)
        name = f"{p}/GroupQueryAttention"
        outs = [f"{name}/output_0", f"present.{i}.key", f"present.{i}.value"]
        ins = [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", self.seqlens_k,
               self.total_len, self.cos, self.sin]
        quant = {}
        if self.prec.kv_cache_dtype == "int8":  # static per-channel scales (position_ids, bias, sink unused)
            ks, vs = self.prec.kv_scales[i]
            ins += ["", "", "", g.init(f"{p}/k_scale", ks.astype(np.float32)), g.init(f"{p}/v_scale", vs.astype(np.float32))]
            quant = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        g.nodes.append(helper.make_node(
            "GroupQueryAttention", ins, outs, name=name, domain=MS, num_heads=d.heads, kv_num_heads=d.kv_heads,
            do_rotary=1, rotary_interleaved=0, scale=float(d.head_dim ** -0.5), **quant))
        y = g.one("Cast", [outs[0]], f"{name}/Cast_fp32", to=TensorProto.FLOAT) if half else outs[0]
        return g.linear(f"{p}/o_proj", y, lw.o, bo, "attention")

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
            k,v: (Cast fp16) Concat(past, new) on axis 2 --> present.{i}.* (Cast fp32); GQA: Expand kv heads
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
        half = self.prec.kv_cache_dtype == "float16"  # stored in fp16, computed in fp32
        if half:
            kh = g.one("Cast", [kh], f"{p}/k/Cast_fp16", to=TensorProto.FLOAT16)
            vh = g.one("Cast", [vh], f"{p}/v/Cast_fp16", to=TensorProto.FLOAT16)
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.key", kh], [f"present.{i}.key"],
                                        name=f"{p}/k/Concat_past", axis=2))
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.value", vh], [f"present.{i}.value"],
                                        name=f"{p}/v/Concat_past", axis=2))
        kk, vv = f"present.{i}.key", f"present.{i}.value"
        if half:
            kk = g.one("Cast", [kk], f"{p}/k/Cast_fp32", to=TensorProto.FLOAT)
            vv = g.one("Cast", [vv], f"{p}/v/Cast_fp32", to=TensorProto.FLOAT)
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
