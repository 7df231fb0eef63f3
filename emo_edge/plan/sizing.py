"""The planner's arithmetic: bytes per component, KV cache, and the decode-speed estimate. Pure functions of the
model's shape, the kept experts, the precisions, the layouts and the target; nothing is read from disk.

File bytes, per component, in the exact layouts of `emo_edge/quant.py`:
  * a matrix W[N, K] at fp32/fp16 costs N*K*4 / N*K*2 bytes;
  * at int8/int4 (MatMulNBits / QMoE / GatherBlockQuantized, blocks of `block_size` along K, K padded up to
    whole blocks): N*nb*block_size*bits/8 codes + N*nb scales (layout.scale_bytes each) + when asymmetric
    N*ceil(nb*bits/8) packed zero points, with nb = ceil(K / block_size);
  * attention: q [nh*hd, H], k/v [nkv*hd, H], o [H, nh*hd] per layer (+ fp32 biases), the attention layout;
  * experts: per MoE layer, every kept routed expert at the experts' layout (QMoE fc1 [2I, H] gate+up and fc2
    [H, I]), plus the implicit (shared / always-active) experts and dense layers' SwiGLU MLPs, which are
    MatMulNBits: the experts' block size and symmetry, scales of the activation dtype;
  * router: always fp32, only the rows of kept routed experts (+ the implicit experts' rows where their weight
    comes from the router: always-active experts, or several shared experts);
  * embedding [V, H] (Gather / GatherBlockQuantized, its own layout);
  * lm_head [V, H]: always its own copy, also when tied (the exporter writes a MatMulNBits/Gemm weight beside the
    embedding's Gather table; onnxruntime cannot share one initializer between the two);
  * norms fp32; RoPE cos/sin caches [context, head_dim/2] each, in the KV dtype where GroupQueryAttention runs
    (head_dim % 16 == 0; it then runs in the KV dtype), fp32 otherwise.
Resident bytes differ from file bytes where the target upcasts fp16 weights (`target.fp16_resident_bytes`) and
where onnxruntime prepacks the int4/int8 MatMulNBits and QMoE weights (`prepacked_extra`: per block a float32 scale
and a float32 block sum instead of the file's scale).
KV cache: 2 * layers * kv_heads * head_dim * context * (4 for float32, 2 for float16, 1 for int8) (+ int8's
per-channel fp32 scales, 2 * layers * kv_heads * head_dim * 4, counted with the weights as "kv_scales"). All-fp32
plans keep a float32 cache (they are verified exact against the reference); every other plan uses the target's
kv_cache_dtype, or another of its kv_cache_dtypes where the planner's search prefers it (see emo_edge/plan/search.py).

Decode-speed estimate (`decode_estimate`): seconds per token = layers * speed.layer_s (fixed cost of a layer's
kernels, what a model that sits in the cache pays) + for each kernel class (fp32 MatMul/Gemm/attention, int8 and
int4 MatMulNBits/QMoE) the bytes it reads per token from memory / speed.bandwidth[class], the effective bandwidth
measured for that class (bench/quant_layout.py calibrate: the int4 kernels' int8 activation arithmetic keeps them
further below the memory's speed than fp32 MatMul). Bytes read per token: attention, dense MLPs, routers and norms
whole; routed_k of the kept routed experts and every implicit expert of each MoE layer; one embedding row; the
whole lm_head; the KV cache at speed.context_tokens (capped at the context). fp16 weights are read as the fp32
copy onnxruntime folds them to. A share min(1, cache_bytes / resident weights) of the reads is taken to hit the
last-level cache (free beyond layer_s).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from targets import KV_BYTES  # bytes per KV element, by dtype: the targets' own table

from ..errors import EmoEdgeError
from ..model.spec import EmoSpec

COMPONENTS = ("attention", "experts", "embedding", "lm_head")
BITS = {"int8": 8, "int4": 4}
FLOAT_BYTES = {"fp32": 4, "fp16": 2}
SCALE_BYTES = {"float32": 4, "float16": 2}
GQA_HEAD_MULTIPLE = 16  # the CPU GroupQueryAttention kernel needs head_size % 16 == 0 (else plain attention ops)
MIN_BLOCK = 16  # the smallest block MatMulNBits / QMoE / GatherBlockQuantized take (powers of two)


def matrix_bytes(n: int, k: int, precision: str, block_size: int = 32, symmetric: bool = True,
                 scale_bytes: int = 4) -> int:
    """File bytes of a weight W[N, K] stored at `precision` (quantized along K in blocks)."""
    if precision in FLOAT_BYTES:
        return n * k * FLOAT_BYTES[precision]
    if precision not in BITS:
        raise EmoEdgeError(f"unknown precision '{precision}' (known: fp32, fp16, int8, int4)")
    bits = BITS[precision]
    nb = -(-k // block_size)
    size = n * nb * block_size * bits // 8 + n * nb * scale_bytes
    if not symmetric:
        size += n * (-(-nb * bits // 8))
    return size


# ---- layouts ---------------------------------------------------------------------------------------------
def _largest_block(block: int, *dims: int) -> int:
    b = block
    while b > MIN_BLOCK and any(d % b for d in dims):
        b //= 2
    return b


def effective_layouts(spec: EmoSpec, target, overrides: Mapping | None = None) -> dict[str, dict]:
    """Per component, the target's layout with the block size lowered (by halving, not below 16) where the
    operator needs whole blocks: QMoE needs hidden and intermediate sizes divisible by it, GatherBlockQuantized
    the hidden size; MatMulNBits pads K, so attention and lm_head keep the target's block."""
    out = {}
    for c in COMPONENTS:
        lay = (overrides or {}).get(c) or target.layout(c)
        lay = lay.to_dict()
        dims = {"experts": (spec.hidden_size, spec.intermediate_size), "embedding": (spec.hidden_size,)}.get(c, ())
        lay["block_size"] = _largest_block(lay["block_size"], *dims)
        out[c] = lay
    return out


def quantizable(spec: EmoSpec, component: str, precision: str, layouts: Mapping[str, dict]) -> bool:
    """Whether `component` can be stored at `precision` with its (effective) layout."""
    if precision not in BITS:
        return True
    b = layouts[component]["block_size"]
    if component == "experts":
        return spec.hidden_size % b == 0 and spec.intermediate_size % b == 0
    if component == "embedding":
        return spec.hidden_size % b == 0
    return True


def matmul_layout(layout: Mapping, target) -> dict:
    """The MatMulNBits version of a layout: same block and symmetry, scales of the activation dtype."""
    return {**layout, "scale_dtype": target.activation_dtype}


def kv_dtypes(spec: EmoSpec, precision: Mapping[str, str], target) -> tuple[str, ...]:
    """The KV cache dtypes a plan may use, preferred first: float32 for all-fp32 plans (exact against the
    reference); else the target's kv_cache_dtype, then its other kv_cache_dtypes. int8 needs GroupQueryAttention
    (its static per-channel scales, k_scale/v_scale); the plain-attention graph of odd head sizes has no int8 path."""
    if all(precision[c] == "fp32" for c in COMPONENTS):
        return ("float32",)
    gqa = spec.head_dim % GQA_HEAD_MULTIPLE == 0
    allowed = dict.fromkeys([target.kv_cache_dtype, *target.kv_cache_dtypes])
    return tuple(d for d in allowed if d != "int8" or gqa)


def rope_dtype(spec: EmoSpec, kv: str) -> str:
    """GroupQueryAttention runs in a float KV dtype (its cos/sin caches with it); with an int8 cache it runs in
    float32, and so does plain attention."""
    return kv if spec.head_dim % GQA_HEAD_MULTIPLE == 0 and kv != "int8" else "float32"


# ---- bytes ------------------------------------------------------------------------------------------------
def _m(n: int, k: int, precision: str, layout: Mapping) -> int:
    return matrix_bytes(n, k, precision, layout["block_size"], layout["symmetric"], SCALE_BYTES[layout["scale_dtype"]])


def expert_bytes(spec: EmoSpec, precision: str, layout: Mapping, inter: int | None = None) -> int:
    """One SwiGLU expert (gate+up [2I, H], down [H, I]) at `precision` and `layout`."""
    inter = spec.intermediate_size if inter is None else inter
    return _m(2 * inter, spec.hidden_size, precision, layout) + _m(spec.hidden_size, inter, precision, layout)


def attention_bytes(spec: EmoSpec, precision: str, layout: Mapping) -> int:
    """One layer's q/k/v/o projections (+ fp32 biases)."""
    H, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    out = _m(q, H, precision, layout) + 2 * _m(kv, H, precision, layout) + _m(H, q, precision, layout)
    return out + (4 * (q + 2 * kv + H) if spec.attention_bias else 0)


def component_bytes(spec: EmoSpec, experts: Sequence[Sequence[int] | None], implicit: Sequence[Sequence[int]],
                    precision: Mapping[str, str], layouts: Mapping[str, dict], target) -> dict[str, int]:
    """File bytes per component (attention, experts, router, dense_mlp, embedding, lm_head, norms)."""
    H, V = spec.hidden_size, spec.vocab_size
    pa, pe, pm, ph = (precision[c] for c in COMPONENTS)
    mm = matmul_layout(layouts["experts"], target)
    out = {"attention": spec.num_layers * attention_bytes(spec, pa, layouts["attention"]), "experts": 0,
           "router": 0, "dense_mlp": 0}
    routed, mlp = expert_bytes(spec, pe, layouts["experts"]), expert_bytes(spec, pe, mm)
    for layer in spec.layers:
        if layer.num_experts == 0:
            d = spec.dense_intermediate_size or 0
            out["dense_mlp"] += expert_bytes(spec, pe, mm, d) + (4 * (2 * d + H) if spec.dense_mlp_bias else 0)
            continue
        n_routed, n_impl = len(experts[layer.index] or ()), len(implicit[layer.index])
        out["experts"] += n_routed * routed + n_impl * mlp
        # the implicit experts' router rows only where their weights come from the router (always-active, or
        # several shared experts: their own softmax); one shared expert has weight 1 and no row in the bundle
        needs_rows = layer.routing == "always_active" or n_impl > 1
        out["router"] += (n_routed + (n_impl if needs_rows else 0)) * H * 4
    out["embedding"] = _m(V, H, pm, layouts["embedding"])
    out["lm_head"] = _m(V, H, ph, layouts["lm_head"])
    out["norms"] = 4 * H * (2 * spec.num_layers + 1)
    return out


PACKED_BLOCK_BYTES = 8  # MLAS's prepacked int8-activation layout: a float32 scale + a float32 block sum per block


def _blocks(n: int, k: int, layout: Mapping) -> int:
    return n * -(-k // layout["block_size"])


def _file_block_bytes(precision: str, layout: Mapping) -> float:
    """What a block costs in the file beyond its codes: its scale and (asymmetric) its packed zero point."""
    return SCALE_BYTES[layout["scale_dtype"]] + (0 if layout["symmetric"] else BITS[precision] / 8)


def prepacked_extra(spec: EmoSpec, experts: Sequence[Sequence[int] | None], implicit: Sequence[Sequence[int]],
                    precision: Mapping[str, str], layouts: Mapping[str, dict], target) -> int:
    """Resident bytes beyond the file of the MatMulNBits / QMoE weights (attention, experts, lm_head) once
    onnxruntime has prepacked them at accuracy_level 4 (int8 activations): MLAS keeps the codes plus a float32
    scale and a float32 block sum per block, and the originals' pages are released (emo_edge/engine/ort_session.py).
    Per block: PACKED_BLOCK_BYTES - the file's scale (and zero point) bytes; measured by bench/residency.py
    stages (block 64, fp32 scales: 5.0 bits per weight resident against 4.5 in the file; float16 QMoE scales are
    kept as float32). The embedding's GatherBlockQuantized reads the mapped file as is (no extra)."""
    if target.accuracy_level != 4:
        return 0
    H, I = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    extra = 0.0

    def add(blocks: int, component: str, layout: Mapping) -> None:
        nonlocal extra
        if precision[component] in BITS:
            extra += blocks * (PACKED_BLOCK_BYTES - _file_block_bytes(precision[component], layout))

    att = layouts["attention"]
    add(spec.num_layers * (_blocks(q + 2 * kv, H, att) + _blocks(H, q, att)), "attention", att)
    lay, mm = layouts["experts"], matmul_layout(layouts["experts"], target)
    per_expert = lambda L, inter: _blocks(2 * inter, H, L) + _blocks(H, inter, L)  # noqa: E731
    for layer in spec.layers:
        if layer.num_experts == 0:
            add(per_expert(mm, spec.dense_intermediate_size or 0), "experts", mm)
            continue
        add(len(experts[layer.index] or ()) * per_expert(lay, I), "experts", lay)
        add(len(implicit[layer.index]) * per_expert(mm, I), "experts", mm)
    add(_blocks(spec.vocab_size, H, layouts["lm_head"]), "lm_head", layouts["lm_head"])
    return int(extra)


def resident_bytes(comp: Mapping[str, int], precision: Mapping[str, str], target, extra: int = 0) -> int:
    """Weight bytes once loaded: fp16 weights cost target.fp16_resident_bytes per element (upcast copies);
    `extra`: what prepacking adds beyond that (`prepacked_extra`)."""
    r = lambda b, p: b * target.fp16_resident_bytes // 2 if p == "fp16" else b  # noqa: E731
    pa, pe, pm, ph = (precision[c] for c in COMPONENTS)
    return (r(comp["attention"], pa) + r(comp["experts"] + comp["dense_mlp"], pe) + r(comp["embedding"], pm)
            + r(comp["lm_head"], ph) + comp["router"] + comp["norms"] + comp.get("rope", 0) + comp.get("kv_scales", 0)
            + extra)


def kv_cache_bytes(spec: EmoSpec, context: int, dtype: str) -> int:
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * context * KV_BYTES[dtype]


def rope_bytes(spec: EmoSpec, context: int, dtype: str) -> int:
    return 2 * context * (spec.head_dim // 2) * KV_BYTES[dtype]


# ---- decode speed -----------------------------------------------------------------------------------------
def _read(file_bytes: int, precision: str) -> tuple[str, int]:
    """(kernel class, bytes streamed) for a weight: fp16 weights run as the fp32 copy onnxruntime folds them to."""
    return ("fp32", file_bytes * 2) if precision == "fp16" else (precision, file_bytes)


def decode_bytes(spec: EmoSpec, comp: Mapping[str, int], precision: Mapping[str, str], layouts: Mapping[str, dict],
                 target, experts: Sequence[Sequence[int] | None], implicit: Sequence[Sequence[int]],
                 kv_tokens: int, kv: str) -> dict[str, int]:
    """Bytes read for one decoded token, per kernel class (fp32 | int8 | int4; see the module docstring)."""
    pe = precision["experts"]
    routed = expert_bytes(spec, pe, layouts["experts"])
    mlp = expert_bytes(spec, pe, matmul_layout(layouts["experts"], target))
    active = sum(min(layer.routed_k, len(experts[layer.index] or ())) * routed + len(implicit[layer.index]) * mlp
                 for layer in spec.moe_layers)
    out: dict[str, int] = {"fp32": comp["router"] + comp["norms"] + kv_cache_bytes(spec, kv_tokens, kv)}
    for p, b in (_read(comp["attention"], precision["attention"]), _read(comp["dense_mlp"] + active, pe),
                 _read(comp["embedding"] // spec.vocab_size, precision["embedding"]),
                 _read(comp["lm_head"], precision["lm_head"])):
        out[p] = out.get(p, 0) + int(b)
    return out


def decode_estimate(spec: EmoSpec, per_class: Mapping[str, int], weights_resident: int, kv_tokens: int,
                    target) -> dict:
    """{"tok_s", "bytes_per_token", "context_tokens"}: the estimated decode speed of a plan on the target:
    layers * layer_s + the bytes of each kernel class not served by the cache / that class's bandwidth."""
    s = target.speed
    from_memory = 1.0 - min(1.0, s.cache_bytes / max(weights_resident, 1))
    seconds = spec.num_layers * s.layer_s + sum(from_memory * b / s.bandwidth[p] for p, b in per_class.items())
    return {"tok_s": round(1.0 / seconds, 3), "bytes_per_token": int(sum(per_class.values())),
            "context_tokens": kv_tokens}
