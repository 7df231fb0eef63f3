"""bench/quant_layout.py's measuring tools: onnxruntime on a bundle's model.onnx with the KV cache typed from
the graph (copy or shared-buffer decoding), and the real-width stand-in decoder built by the exporter from random
weights (see bench/quant_layout.py's docstring)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

H, I, HEADS, HD, ROUTED, VOCAB, LAYERS = 2048, 1024, 16, 128, 8, 25088, 4


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ---- onnxruntime directly, the KV cache typed from the graph's inputs ----------------------------------------
class Decoder:
    """model.onnx with the genai-style I/O; the KV dtype is read from the past_key_values inputs' types."""

    def __init__(self, path: Path, threads: int = 2):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        self.ort = ort
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.past = sorted((n for n in ins if n.startswith("past_key_values.")),
                           key=lambda n: (int(n.split(".")[1]), n.endswith("value")))
        first = ins[self.past[0]]
        self.kv_type = first.type  # 'tensor(float)' | 'tensor(float16)'
        self.dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}[first.type]
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.outs = [o.name for o in self.sess.get_outputs()]

    def empty(self, n: int = 0) -> dict:
        return {p: np.zeros((1, self.kv_heads, n, self.head_dim), self.dtype) for p in self.past}

    def feed(self, ids, start: int) -> dict:
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        t = ids.shape[1]
        return {"input_ids": ids, "attention_mask": np.ones((1, start + t), np.int64),
                "position_ids": np.arange(start, start + t, dtype=np.int64)[None]}

    def step(self, ids, start: int, kv: dict):
        res = dict(zip(self.outs, self.sess.run(None, {**self.feed(ids, start), **kv})))
        return res["logits"][0], {p: res[p.replace("past_key_values.", "present.")] for p in self.past}

    def logits(self, ids) -> np.ndarray:
        return self.step(ids, 0, self.empty())[0].astype(np.float32)

    def decode_copy(self, prompt: int, tokens: int, vocab: int) -> list[float]:
        """Seconds per decoded token, past in / present out (chunked 256-token prefill first)."""
        rng = np.random.default_rng(0)
        kv, pos = self.empty(), 0
        ids = rng.integers(3, vocab, prompt)
        for a in range(0, prompt, 256):
            logits, kv = self.step(ids[a:a + 256], pos, kv)
            pos += len(ids[a:a + 256])
        out = []
        for _ in range(tokens):
            t = time.perf_counter()
            logits, kv = self.step([int(np.argmax(logits[-1]))], pos, kv)
            out.append(time.perf_counter() - t)
            pos += 1
        return out

    def decode_shared(self, prompt: int, tokens: int, capacity: int) -> list[float]:
        """Seconds per decoded token with past/present bound to one [1, kv, capacity, hd] buffer per tensor."""
        rng = np.random.default_rng(0)
        io = self.sess.io_binding()
        keep = []
        for p in self.past:
            buf = self.ort.OrtValue.ortvalue_from_numpy(
                rng.standard_normal((1, self.kv_heads, capacity, self.head_dim)).astype(self.dtype))
            keep.append(buf)
            io.bind_ortvalue_input(p, buf)
            io.bind_ortvalue_output(p.replace("past_key_values.", "present."), buf)
        io.bind_output("logits")
        out = []
        for i in range(tokens + 1):  # the first step warms up
            for name, arr in self.feed([5 + i], prompt + i).items():
                io.bind_cpu_input(name, arr)
            t = time.perf_counter()
            self.sess.run_with_iobinding(io)
            out.append(time.perf_counter() - t)
        return out[1:]


# ---- the real-width stand-in graph ------------------------------------------------------------------------
def speed_spec():
    from emo_edge.model.spec import spec_from_config
    from emo_edge.model.synth import PRESETS, build_config
    return spec_from_config(build_config(PRESETS["emo-14b"], layers=LAYERS, num_experts=ROUTED + 1,
                                         vocab_size=VOCAB))


def build_speed_graph(out: Path, layouts: dict, kv: str, context: int = 4096, precision: str = "int4") -> int:
    """A LAYERS-layer real-width decoder (int4 unless `precision`) from random weights (see the module
    docstring). Returns the weight file bytes."""
    from emo_edge.export.pipeline import rope_caches
    from exporters.onnx import DecoderBuilder, LayerWeights, ModelDims, Precision

    spec = speed_spec()
    rng = np.random.default_rng(0)
    base = [rng.standard_normal((2 * I, H), dtype=np.float32) * 0.02 for _ in range(3)]
    mat = lambda n, k, j=0: np.ascontiguousarray(base[j % 3].reshape(-1)[: n * k].reshape(n, k))  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    scales = [(np.full(HEADS * HD, 0.05, np.float32),) * 2] * LAYERS if kv == "int8" else None  # speed only
    prec = Precision(precision, precision, precision, precision, layouts, 4, kv, scales)
    dims = ModelDims(VOCAB, H, I, LAYERS, HEADS, HEADS, HD, 1e-6, False, context)
    cos, sin = rope_caches(spec, context)
    b = DecoderBuilder(out, dims, prec, cos, sin)
    table = rng.standard_normal((VOCAB, H), dtype=np.float32) * 0.02
    b.embedding(lambda a, c: table[a:c])
    for i in range(LAYERS):
        lw = LayerWeights(attn_norm=np.ones(H, np.float32), ffn_norm=np.ones(H, np.float32), q=mat(H, H, i),
                          k=mat(H, H, i + 1), v=mat(H, H, i + 2), o=mat(H, H, i), attn_bias=None, routing="shared")
        lw.router_routed, lw.router_implicit = mat(ROUTED, H, i), mat(1, H, i)
        lw.routed_k, lw.n_routed = ROUTED - 1, ROUTED
        lw.routed = lambda i=i: ((mat(I, H, j), mat(I, H, j + 1), mat(H, I, j + 2)) for j in range(i, i + ROUTED))
        lw.implicit = [(mat(I, H, i), mat(I, H, i + 1), mat(H, I, i + 2))]
        b.layer(i, lw)
    b.head(np.ones(H, np.float32), lambda a, c: table[a:c])
    b.save()
    b.data.close()
    return (out / "model.onnx.data").stat().st_size
