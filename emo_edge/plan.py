"""The export planner: which experts and which precision per component, sized against a memory budget.

An `ExportPlan` is pure data (frozen, JSON round-trippable) that the exporter follows and the bundle stores as
`plan.json`. `make_plan` is a pure function of the model's shape, the pool union, the budget, the context and
the target; nothing is read from disk.

Byte accounting (`weight_bytes`) -- per component, in the exact layouts of `emo_edge/quant.py`:
  * a matrix W[N, K] at fp32/fp16 costs N*K*4 / N*K*2 bytes;
  * at int8/int4 (MatMulNBits / QMoE / GatherBlockQuantized, blocks of `block_size` along K, K padded up to
    whole blocks): N*nb*block_size*bits/8 codes + N*nb scales (target.scale_bytes each) + when asymmetric
    N*ceil(nb*bits/8) packed zero points, with nb = ceil(K / block_size);
  * attention: q [nh*hd, H], k/v [nkv*hd, H], o [H, nh*hd] per layer (+ fp32 biases);
  * experts: per MoE layer, every kept routed expert plus the implicit (shared / always-active) ones, each
    gate+up as one [2I, H] (QMoE fc1) and down [H, I] (fc2); dense layers' SwiGLU MLPs use the expert precision;
  * router: always fp32, only the rows of kept experts (the bundle's expert j of layer l is experts[l][j],
    followed by the implicit experts);
  * embedding [V, H] (Gather / GatherBlockQuantized, needs H % block_size == 0 when quantized);
  * lm_head [V, H]; a tied head at the embedding's precision shares its bytes (0 extra), otherwise it is a copy;
  * norms fp32; RoPE cos/sin caches fp32 [context, head_dim/2] each.
Resident bytes differ from file bytes where the target upcasts fp16 weights (`target.fp16_resident_bytes`).
The budget covers resident weights + KV cache (2 * layers * kv_heads * head_dim * context * kv element bytes)
+ runtime overhead (`target.overhead_bytes`, a formula fitted to measurements; see targets/cpu.json).

`auto` search order: every assignment of the target's allowed precisions to (attention, experts, embedding,
lm_head) is ranked by a provisional accuracy cost  sum_c SENSITIVITY[c] * NOISE[precision_c]  (NOISE is the
relative quantization step: fp16 ~0, int8 1, int4 18 = 127/7; SENSITIVITY: lm_head 3 > attention 2 > experts 1
> embedding 0.5), ties broken by more bytes first; the first assignment that fits the budget with the full
pool wins. So: all fp16, then int8 on embedding, experts, attention, lm_head in turn, ... down to all int4.
Components fixed by the caller (`precision="int4"` or {"experts": "int4"}) are not searched.
If even the smallest assignment does not fit, the lowest-scored routed experts are trimmed one at a time
(globally lowest score first; ties: the layer keeping the most experts, then lower layer, then lower id), never
below `routed_k` per layer, and the plan records each in `trimmed`. If the minimum model (smallest assignment,
routed_k routed experts per layer) does not fit, `BudgetError` states that minimum.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from .errors import BudgetError, BundleError, EmoEdgeError
from .spec import EmoSpec, check_context
from .units import fmt_bytes

PLAN_VERSION = 1
COMPONENTS = ("attention", "experts", "embedding", "lm_head")
BITS = {"int8": 8, "int4": 4}
FLOAT_BYTES = {"fp32": 4, "fp16": 2}
# Provisional accuracy model for the auto search (see module docstring); replace with measured KL per component.
NOISE = {"fp32": 0.0, "fp16": 0.01, "int8": 1.0, "int4": 18.0}
SENSITIVITY = {"lm_head": 3.0, "attention": 2.0, "experts": 1.0, "embedding": 0.5}


@dataclass(frozen=True)
class ExportPlan:
    source_identity: str
    target: str
    experts: list  # per layer: sorted kept routed expert ids (source numbering), None for dense layers
    implicit: list  # per layer: shared / always-active expert ids (always kept; [] for none / dense)
    precision: dict  # attention, experts, embedding, lm_head -> fp16|int8|int4; router -> fp32
    block_size: int
    symmetric: bool
    scale_dtype: str
    accuracy_level: int
    kv_cache_dtype: str
    context: int
    budget: int | None
    bytes: dict  # file bytes per component, weights, weights_resident, kv_cache, overhead, total
    trimmed: list = field(default_factory=list)  # [{"layer", "expert", "score", "reason"}]
    notes: list = field(default_factory=list)
    version: int = PLAN_VERSION

    # ---- convenience for exporters -------------------------------------------------------------------
    def layer_experts(self, layer: int) -> list[int]:
        """The bundle's expert order for a MoE layer: kept routed experts, then the implicit ones."""
        kept = self.experts[layer]
        return [] if kept is None else list(kept) + list(self.implicit[layer])

    def quant_scheme(self, component: str):
        """A `quant.QuantScheme` for an int8/int4 component, None for fp16/fp32."""
        p = self.precision[component]
        if p not in BITS:
            return None
        from .quant import QuantScheme
        return QuantScheme(bits=BITS[p], block_size=self.block_size, symmetric=self.symmetric,
                           scale_dtype=self.scale_dtype)

    # ---- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExportPlan":
        if not isinstance(d, Mapping):
            raise BundleError("plan: expected a JSON object")
        if d.get("version") != PLAN_VERSION:
            raise BundleError(f"plan: version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(names - set(d))
        if missing:
            raise BundleError(f"plan: missing field '{missing[0]}'")
        kw = {k: d[k] for k in names}
        kw["experts"] = [None if e is None else [int(x) for x in e] for e in d["experts"]]
        kw["implicit"] = [[int(x) for x in e] for e in d["implicit"]]
        kw["precision"] = dict(d["precision"])
        kw["bytes"] = {k: int(v) for k, v in d["bytes"].items()}
        kw["trimmed"] = [dict(t) for t in d["trimmed"]]
        kw["notes"] = list(d["notes"])
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> "ExportPlan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise BundleError(f"plan: not valid JSON ({exc})") from None


# ---- byte accounting (pure arithmetic) ---------------------------------------------------------------------
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


def _resident(file_bytes: int, precision: str, fp16_resident: int) -> int:
    return file_bytes * fp16_resident // 2 if precision == "fp16" else file_bytes


def weight_bytes(spec: EmoSpec, experts: Sequence[Sequence[int] | None], implicit: Sequence[Sequence[int]],
                 precision: Mapping[str, str], target) -> tuple[dict[str, int], int]:
    """(file bytes per component, resident weight bytes) for kept experts `experts` (+ `implicit`)."""
    bs, sym, sb = target.block_size, target.symmetric, target.scale_bytes
    m = lambda n, k, p: matrix_bytes(n, k, p, bs, sym, sb)  # noqa: E731
    H, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    pa, pe, pm, ph = (precision[c] for c in COMPONENTS)
    attn = m(q, H, pa) + 2 * m(kv, H, pa) + m(H, q, pa)
    if spec.attention_bias:
        attn += 4 * (q + 2 * kv + H)
    per_expert = m(2 * I, H, pe) + m(H, I, pe)
    out = {"attention": spec.num_layers * attn, "experts": 0, "router": 0, "dense_mlp": 0}
    for layer in spec.layers:
        if layer.num_experts == 0:
            d = spec.dense_intermediate_size or 0
            out["dense_mlp"] += m(2 * d, H, pe) + m(H, d, pe) + (4 * (2 * d + H) if spec.dense_mlp_bias else 0)
            continue
        n = len(experts[layer.index] or ()) + len(implicit[layer.index])
        out["experts"] += n * per_expert
        out["router"] += n * H * 4
    out["embedding"] = m(V, H, pm)
    shared_head = spec.tie_word_embeddings and ph == pm
    out["lm_head"] = 0 if shared_head else m(V, H, ph)
    out["norms"] = 4 * H * (2 * spec.num_layers + 1)
    out["rope"] = 0  # filled by _totals: fp32 cos/sin caches [context, head_dim/2]
    fp16r = target.fp16_resident_bytes
    resident = (_resident(out["attention"], pa, fp16r) + _resident(out["experts"] + out["dense_mlp"], pe, fp16r)
                + _resident(out["embedding"], pm, fp16r) + _resident(out["lm_head"], ph, fp16r)
                + out["router"] + out["norms"])
    return out, resident


def kv_cache_bytes(spec: EmoSpec, context: int, target) -> int:
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * context * target.kv_bytes_per_element


def _totals(spec, experts, implicit, precision, context, target) -> dict[str, int]:
    comp, resident = weight_bytes(spec, experts, implicit, precision, target)
    comp["rope"] = 2 * context * (spec.head_dim // 2) * 4
    resident += comp["rope"]
    out = dict(comp)
    out["weights"] = sum(comp.values())
    out["weights_resident"] = resident
    out["kv_cache"] = kv_cache_bytes(spec, context, target)
    out["overhead"] = target.overhead_bytes(resident, spec.vocab_size, spec.hidden_size)
    out["total"] = resident + out["kv_cache"] + out["overhead"]
    return out


# ---- the search -----------------------------------------------------------------------------------------
def _quantizable(spec: EmoSpec, component: str, p: str, block_size: int) -> bool:
    if p not in BITS:
        return True
    if component == "experts":  # QMoE needs hidden and inter divisible by the block
        return spec.hidden_size % block_size == 0 and spec.intermediate_size % block_size == 0
    if component == "embedding":  # GatherBlockQuantized needs hidden divisible by the block
        return spec.hidden_size % block_size == 0
    return True


MIN_BLOCK = 16  # the smallest block MatMulNBits / QMoE / GatherBlockQuantized take (powers of two)


def effective_block_size(spec: EmoSpec, block_size: int) -> int:
    """The target's block size, or the largest smaller power of two (>= 16) that divides hidden and intermediate
    sizes (QMoE and GatherBlockQuantized need whole blocks), so odd-sized models can still be quantized."""
    b = block_size
    while b > MIN_BLOCK and (spec.hidden_size % b or spec.intermediate_size % b):
        b //= 2
    return b


def _parse_precision(precision: str | Mapping[str, str]) -> dict[str, str]:
    """'auto' -> {}, 'int4' -> all four, 'experts=int4,attention=int8' or a dict -> those fixed."""
    if isinstance(precision, Mapping):
        fixed = dict(precision)
    elif precision == "auto":
        fixed = {}
    elif "=" in precision:
        fixed = {}
        for part in precision.split(","):
            name, _, value = part.partition("=")
            fixed[name.strip()] = value.strip()
    else:
        fixed = {c: precision for c in COMPONENTS}
    if fixed.pop("router", "fp32") != "fp32":
        raise EmoEdgeError("precision: the router is always fp32")
    for c, p in fixed.items():
        if c not in COMPONENTS:
            raise EmoEdgeError(f"precision: unknown component '{c}' (known: {', '.join(COMPONENTS)}; router is always fp32)")
        if p not in ("fp32", "fp16", "int8", "int4"):
            raise EmoEdgeError(f"precision: '{p}' for {c} is not one of fp32, fp16, int8, int4")
    return fixed


def candidates(spec: EmoSpec, target, fixed: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Precision assignments in `auto` search order (most accurate first). Bytes tie-break needs no model
    input beyond the shape, so the order is fixed for a given spec and target."""
    fixed = dict(fixed or {})
    options = []
    for c in COMPONENTS:
        if c in fixed:
            if fixed[c] not in target.precisions_for(c):
                raise EmoEdgeError(f"target '{target.name}' cannot store {c} at {fixed[c]} "
                                   f"(allowed: {', '.join(target.precisions_for(c))})")
            if not _quantizable(spec, c, fixed[c], target.block_size):
                raise EmoEdgeError(f"{c} cannot be {fixed[c]} with block size {target.block_size}: hidden "
                                   f"{spec.hidden_size} / intermediate {spec.intermediate_size} not divisible")
            options.append((fixed[c],))
        else:
            options.append(tuple(p for p in target.precisions_for(c) if _quantizable(spec, c, p, target.block_size)))
    full = [list(layer.routed_experts) if layer.num_experts else None for layer in spec.layers]
    imp = [list(layer.implicit_experts) for layer in spec.layers]
    combos = [dict(zip(COMPONENTS, combo)) for combo in itertools.product(*options)]

    def key(pr):
        cost = sum(SENSITIVITY[c] * NOISE[pr[c]] for c in COMPONENTS)
        return (round(cost, 9), -weight_bytes(spec, full, imp, pr, target)[1], tuple(pr[c] for c in COMPONENTS))

    return sorted(combos, key=key)


def _normalise_pool(spec: EmoSpec, pool_union) -> list[list[int] | None]:
    if pool_union is None:
        pool_union = [None] * spec.num_layers
    if len(pool_union) != spec.num_layers:
        raise EmoEdgeError(f"pool has {len(pool_union)} layers, the model has {spec.num_layers}")
    out: list[list[int] | None] = []
    for layer, entry in zip(spec.layers, pool_union):
        if layer.num_experts == 0:
            out.append(None)
            continue
        if entry is None:
            out.append(list(layer.routed_experts))
            continue
        ids = {int(e) for e in entry}
        bad = sorted(e for e in ids if not 0 <= e < layer.num_experts)
        if bad:
            raise EmoEdgeError(f"layer {layer.index}: pool expert {bad[0]} does not exist (layer has {layer.num_experts})")
        routed = sorted(ids - set(layer.implicit_experts))
        if len(routed) < layer.routed_k:
            raise EmoEdgeError(f"layer {layer.index}: pool keeps {len(routed)} routed experts; each token needs {layer.routed_k}")
        out.append(routed)
    return out


def make_plan(spec: EmoSpec, pool_union: Sequence[Sequence[int] | None] | None, budget_bytes: int | None,
              context: int, target="cpu", precision: str | Mapping[str, str] = "auto",
              expert_scores: Sequence[Mapping[int, float] | None] | None = None, identity: str = "") -> ExportPlan:
    """Choose precisions (and, if needed, trim experts) so the bundle fits `budget_bytes` (None: no limit).

    pool_union: per layer, routed expert ids to keep (None: all); implicit experts are always kept.
    expert_scores: per layer {expert id: score} (higher = more important) used only for trimming.
    Raises BudgetError (with the minimum) if even the smallest model does not fit."""
    from targets import get_target

    target = get_target(target)
    notes: list[str] = []
    block = effective_block_size(spec, target.block_size)
    if block != target.block_size:
        import dataclasses

        notes.append(f"block size {block} instead of the target's {target.block_size}: hidden {spec.hidden_size} / "
                     f"intermediate {spec.intermediate_size} are not multiples of {target.block_size}")
        target = dataclasses.replace(target, block_size=block)
    check_context(spec, context)  # a positive int <= spec.MAX_CONTEXT (RoPE tables and KV cache are sized by it)
    if budget_bytes is not None and budget_bytes <= 0:
        raise BudgetError(f"budget must be positive, got {budget_bytes}")
    fixed = _parse_precision(precision)
    kept = _normalise_pool(spec, pool_union)
    implicit = [list(layer.implicit_experts) for layer in spec.layers]
    if spec.max_position_embeddings and context > spec.max_position_embeddings:
        notes.append(f"context {context} exceeds the model's max_position_embeddings {spec.max_position_embeddings}")

    order = candidates(spec, target, fixed)
    fits = lambda b: budget_bytes is None or b["total"] <= budget_bytes  # noqa: E731
    chosen = None
    for pr in order:
        b = _totals(spec, kept, implicit, pr, context, target)
        if fits(b):
            chosen, totals = pr, b
            break
    trimmed: list[dict] = []
    if chosen is None:
        # smallest assignment, then trim experts
        smallest = min(order, key=lambda pr: _totals(spec, kept, implicit, pr, context, target)["total"])
        minimum_pool = [None if k is None else _lowest_dropped(k, spec.layers[i].routed_k, expert_scores, i)
                        for i, k in enumerate(kept)]
        minimum = _totals(spec, minimum_pool, implicit, smallest, context, target)
        if not fits(minimum):
            prec = ", ".join(f"{c} {smallest[c]}" for c in COMPONENTS)
            raise BudgetError(
                f"budget {fmt_bytes(budget_bytes)} ({budget_bytes} bytes) cannot hold the minimum model: "
                f"{fmt_bytes(minimum['total'])} ({minimum['total']} bytes) = weights "
                f"{fmt_bytes(minimum['weights_resident'])} + KV cache at context {context} "
                f"{fmt_bytes(minimum['kv_cache'])} + runtime overhead {fmt_bytes(minimum['overhead'])} "
                f"({prec}; {_min_experts(spec)}). Raise --budget to at least "
                f"{fmt_bytes(minimum['total'])} or lower --context")
        chosen = smallest
        kept = [None if k is None else list(k) for k in kept]
        totals = _totals(spec, kept, implicit, chosen, context, target)
        while not fits(totals):
            layer, expert, score = _next_to_trim(spec, kept, expert_scores)
            kept[layer].remove(expert)
            trimmed.append({"layer": layer, "expert": expert, "score": score, "reason": "budget"})
            totals = _totals(spec, kept, implicit, chosen, context, target)
        per_layer = {}
        for t in trimmed:
            per_layer[t["layer"]] = per_layer.get(t["layer"], 0) + 1
        prec = "/".join(chosen[c] for c in COMPONENTS)
        notes.append(f"even the smallest precisions (attention/experts/embedding/lm_head {prec}) do not fit "
                     f"{fmt_bytes(budget_bytes)} with the full pool: "
                     f"trimmed {len(trimmed)} lowest-scored routed experts "
                     f"({', '.join(f'layer {l}: -{n}' for l, n in sorted(per_layer.items()))})"
                     + ("" if expert_scores else "; no expert scores given, so ties were broken by id"))
    if spec.tie_word_embeddings:
        notes.append("tied embeddings: lm_head " + ("shares the embedding's bytes" if chosen["lm_head"] ==
                     chosen["embedding"] else f"is a separate {chosen['lm_head']} copy"))
    if any(chosen[c] == "fp16" for c in COMPONENTS) and target.fp16_resident_bytes != 2:
        notes.append(f"fp16 weights are upcast at session start on target '{target.name}': "
                     f"{target.fp16_resident_bytes} bytes each resident")
    if not any(chosen[c] in ("int8", "int4") for c in COMPONENTS):  # block sizes only matter to quantized weights
        notes = [n for n in notes if not n.startswith("block size ")]
    precision_out = dict(chosen)
    precision_out["router"] = "fp32"
    return ExportPlan(
        source_identity=identity, target=target.name, experts=[None if k is None else sorted(k) for k in kept],
        implicit=implicit, precision=precision_out, block_size=target.block_size, symmetric=target.symmetric,
        scale_dtype=target.scale_dtype, accuracy_level=target.accuracy_level, kv_cache_dtype=target.kv_cache_dtype,
        context=context, budget=budget_bytes, bytes=totals, trimmed=trimmed, notes=notes)


def _min_experts(spec: EmoSpec) -> str:
    kinds = sorted({(layer.routed_k, len(layer.implicit_experts)) for layer in spec.moe_layers})
    return ", ".join(f"{k} routed + {n} shared/always-active experts" for k, n in kinds) + " per MoE layer"


def _score(expert_scores, layer: int, expert: int) -> float:
    if not expert_scores or expert_scores[layer] is None:
        return 0.0
    s = expert_scores[layer]
    return float(s.get(expert, s.get(str(expert), 0.0)))


def _lowest_dropped(kept: list[int], k: int, expert_scores, layer: int) -> list[int]:
    """The k highest-scored experts of a layer (what trimming converges to)."""
    ranked = sorted(kept, key=lambda e: (-_score(expert_scores, layer, e), -e))
    return sorted(ranked[:k])


def _next_to_trim(spec: EmoSpec, kept, expert_scores) -> tuple[int, int, float]:
    best = None
    for layer in spec.layers:
        ids = kept[layer.index]
        if ids is None or len(ids) <= layer.routed_k:
            continue
        e = min(ids, key=lambda x: (_score(expert_scores, layer.index, x), x))
        key = (_score(expert_scores, layer.index, e), -len(ids), layer.index, e)
        if best is None or key < best[0]:
            best = (key, layer.index, e)
    if best is None:  # cannot happen: the minimum was checked to fit
        raise BudgetError("no expert left to trim")
    return best[1], best[2], best[0][0]


# ---- printing ---------------------------------------------------------------------------------------------
def format_plan(plan: ExportPlan) -> str:
    b, p = plan.bytes, plan.precision
    kept = [len(e) for e in plan.experts if e is not None]
    imp = [len(i) for e, i in zip(plan.experts, plan.implicit) if e is not None]
    per_layer = (f"{min(kept)}-{max(kept)}" if kept and min(kept) != max(kept) else str(kept[0] if kept else 0))
    rows = [("attention", p["attention"], b["attention"], ""),
            ("experts", p["experts"], b["experts"] + b.get("dense_mlp", 0),
             f"{per_layer} routed + {imp[0] if imp else 0} implicit per MoE layer"),
            ("router", "fp32", b["router"], "kept rows only"),
            ("embedding", p["embedding"], b["embedding"], ""),
            ("lm_head", p["lm_head"], b["lm_head"], "shared with embedding" if b["lm_head"] == 0 else ""),
            ("norms", "fp32", b["norms"], ""),
            ("rope", "fp32", b.get("rope", 0), "cos/sin caches")]
    budget = "none" if plan.budget is None else fmt_bytes(plan.budget)
    quantized = any(v in ("int8", "int4") for v in p.values())  # block size means nothing to an all-float plan
    block = f"  block {plan.block_size} {'symmetric' if plan.symmetric else 'asymmetric'}" if quantized else ""
    lines = [f"export plan  target {plan.target}  context {plan.context}  budget {budget}{block}",
             f"{'component':<12}{'precision':<11}{'bytes':>12}  note", "-" * 64]
    for name, prec, size, note in rows:
        lines.append(f"{name:<12}{prec:<11}{fmt_bytes(size):>12}  {note}".rstrip())
    lines.append("-" * 64)
    lines.append(f"{'weights':<12}{'(file)':<11}{fmt_bytes(b['weights']):>12}  bytes in the bundle on disk")
    lines.append(f"{'weights':<12}{'(in RAM)':<11}{fmt_bytes(b['weights_resident']):>12}  resident once loaded "
                 f"(fp16 is upcast on some targets); the budget counts this")
    lines.append(f"{'kv cache':<12}{plan.kv_cache_dtype:<11}{fmt_bytes(b['kv_cache']):>12}  {plan.context} tokens")
    try:
        from targets import get_target
        chunk = f"; prefill chunks <= {get_target(plan.target).overhead.prefill_tokens} tokens"
    except EmoEdgeError:
        chunk = ""
    lines.append(f"{'overhead':<12}{'runtime':<11}{fmt_bytes(b['overhead']):>12}  target {plan.target} formula{chunk}")
    head = "" if plan.budget is None else f"  {100 * b['total'] / plan.budget:.0f}% of budget"
    lines.append(f"{'total':<12}{'':<11}{fmt_bytes(b['total']):>12}{head}")
    if plan.trimmed:
        lines.append(f"trimmed {len(plan.trimmed)} experts: " + ", ".join(
            f"L{t['layer']}/e{t['expert']}" for t in plan.trimmed[:12]) + (" ..." if len(plan.trimmed) > 12 else ""))
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
