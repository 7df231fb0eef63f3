"""ONNX graph-building primitives of the exporter: external data written as the graph is emitted, the
per-component precision (with quantization layouts and the KV cache dtype), and a small node/initializer builder
with the shared building blocks (linear layers, SwiGLU MLPs). exporters/onnx.py builds the decoder with them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from exporters import ort_ops
from emo_edge.quant import QuantScheme, quantize_blockwise

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
DEFAULT_LAYOUT = {"block_size": 32, "symmetric": True, "scale_dtype": "float32"}


@dataclass
class Precision:
    """Per-component precision: fp32 | fp16 | int8 | int4 (routers and norms always fp32), the quantization
    layout of each component ({"block_size", "symmetric", "scale_dtype"}, see emo_edge/plan/sizing.py) and the
    KV cache dtype (float32 | float16; GroupQueryAttention then runs in it)."""
    attention: str = "fp32"
    experts: str = "fp32"
    embedding: str = "fp32"
    lm_head: str = "fp32"
    layouts: dict = field(default_factory=dict)  # component -> layout; missing: DEFAULT_LAYOUT
    accuracy_level: int = 4
    kv_cache_dtype: str = "float32"  # float32 | float16 | int8
    kv_scales: list | None = None  # int8 cache: per layer (k_scale, v_scale) fp32 [kv_heads * head_dim]

    def of(self, component: str) -> str:
        return "fp32" if component == "router" else getattr(self, component)

    def scheme(self, component: str, matmul: bool = False) -> QuantScheme | None:
        """The QuantScheme of an int8/int4 component (None for fp32/fp16). `matmul`: for a MatMulNBits, whose
        scales must be of the (float32) activation type whatever the component's layout says."""
        prec = self.of(component)
        if prec in ("fp32", "fp16"):
            return None
        lay = self.layouts.get(component, DEFAULT_LAYOUT)
        return QuantScheme(bits=4 if prec == "int4" else 8, block_size=lay["block_size"], symmetric=lay["symmetric"],
                           scale_dtype="float32" if matmul else lay["scale_dtype"],
                           rounding=lay.get("rounding", "absmax"))  # a plan written before rounding was recorded

    @property
    def kv_type(self) -> int:
        return {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}[
            self.kv_cache_dtype]


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
        """Take (nodes, inits, out) from exporters.ort_ops, streaming the inits to the data file."""
        nodes, inits, out = em
        self.nodes += nodes
        self.inits += [self.data.add_proto(t) for t in inits]
        return out

    # ---- building blocks ------------------------------------------------------------------------------
    def linear(self, prefix: str, x: str, w: np.ndarray, bias: np.ndarray | None, component: str) -> str:
        """y = x @ W^T (+ b), W stored at `component`'s precision (router: fp32)

            x [.., K] --MatMul(W^T [K, N]) | MatMulNBits(W q)--> [.., N] --(Add b)--> y
        """
        prec = self.prec.of(component)
        scheme = self.prec.scheme(component, matmul=True)
        if scheme is None:
            y = self.one("MatMul", [x, self.weight(f"{prefix}.weight_T", np.ascontiguousarray(w.T), prec)],
                         f"{prefix}/MatMul")
        else:
            y = self.emitted(ort_ops.matmul_nbits(prefix, x, quantize_blockwise(w, scheme), self.prec.accuracy_level))
        if bias is not None:
            y = self.one("Add", [y, self.init(f"{prefix}.bias", bias.astype(np.float32))], f"{prefix}/Add")
        return y

    def swiglu_mlp(self, prefix: str, x: str, gate, up, down, component: str, biases=None) -> str:
        """down(silu(gate x + bg) * (up x + bu)) + bd

            x --gate_up_proj--> [g | u] --Split--> g --Sigmoid--> s --Mul(g)--> a --+
                                                   u --------------------------------Mul--> down_proj --> y
        (gate and up stacked in one projection: the same rows and blocks as two, one node fewer)
        """
        bg, bu, bd = biases or (None, None, None)
        b = stacked_bias((bg, gate), (bu, up))
        gu = self.linear(f"{prefix}/gate_up_proj", x, np.concatenate([gate, up]), b, component)
        sizes = self.init(f"{prefix}/gate_up_split", np.array([gate.shape[0], up.shape[0]], np.int64))
        g, u = self.node("Split", [gu, sizes], f"{prefix}/gate_up/Split", 2, axis=-1)
        s = self.one("Sigmoid", [g], f"{prefix}/act/Sigmoid")
        a = self.one("Mul", [g, s], f"{prefix}/act/Mul")
        h = self.one("Mul", [a, u], f"{prefix}/Mul")
        return self.linear(f"{prefix}/down_proj", h, down, bd, component)


def stacked_bias(*parts) -> np.ndarray | None:
    """The bias of projections stacked row-wise, from (bias or None, weight [rows, in]) pairs: zeros for a
    part without one; None when no part has one."""
    if all(b is None for b, _ in parts):
        return None
    return np.concatenate([np.zeros(w.shape[0], np.float32) if b is None else b for b, w in parts])
