"""The export planner: which experts and which precision per component, sized against a memory budget.

An `ExportPlan` is pure data (frozen, JSON round-trippable) that the exporter follows and the bundle stores as
`plan.json`. `make_plan` is a pure function of the model's shape, the pool union, the budget, the context and
the target; nothing is read from disk. The arithmetic (bytes per component, KV cache, decode-speed estimate) is
in `emo_edge/plan/sizing.py`; its docstring states every rule.

The budget covers resident weights + KV cache (float32 for all-fp32 plans, else float16 or int8: see below)
+ runtime overhead (`target.overhead_bytes`, a formula fitted to measurements; see targets/cpu.json).

`auto` search order: every assignment of the target's allowed precisions to (attention, experts, embedding,
lm_head) is ranked by a provisional accuracy cost  sum_c SENSITIVITY[c] * NOISE[precision_c]  (NOISE is the
relative quantization step: fp16 ~0, int8 1, int4 18 = 127/7; SENSITIVITY: lm_head 3 > attention 2 > experts 1
> embedding 0.5), ties broken by more bytes first. Each assignment is tried with each KV cache dtype it may use
(`plan_bytes.kv_dtypes`: float32 for all-fp32, else the target's kv_cache_dtype then its other kv_cache_dtypes),
adding SENSITIVITY["kv_cache"] * KV_NOISE[dtype] to the cost (`search_order`). Among the items that fit the budget
with the full pool, `optimize` picks:
  * "balanced" (default): the first (most accurate) whose estimated decode tok/s is at least
    target.speed.balanced_fraction of the fastest fitting one's (the experts are the same for all of them), or
    at least target.speed.enough_tok_s (decode outruns any reader there: accuracy alone decides);
  * "quality": the first that fits (most accurate, whatever its speed);
  * "speed": the fastest (first in search order among equals), over the target's layouts and its fallback
    layouts (coarser blocks, fewer bytes per token) alike; the exporter then also runs EMO's shared expert
    inside each QMoE (exporters/onnx.py DecoderBuilder fold_shared).
The estimate of the chosen plan is in `speed`, and a note says when speed ruled out a more accurate plan.
Components fixed by the caller (`precision="int4"` or {"experts": "int4"}) are not searched.
If no assignment fits, the smallest one is taken and the lowest-scored routed experts are trimmed one at a time
(globally lowest score first; ties: the layer keeping the most experts, then lower layer, then lower id), never
below `routed_k` per layer, and the plan records each in `trimmed`. If the minimum model (smallest assignment,
routed_k routed experts per layer) does not fit, `BudgetError` states that minimum.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import BudgetError, BundleError, EmoEdgeError
from .sizing import (  # noqa: F401  (matrix_bytes, kv_cache_bytes: part of this module's API)
    BITS, COMPONENTS, component_bytes, decode_bytes, decode_estimate, effective_layouts, kv_cache_bytes, kv_dtypes,
    matrix_bytes, prepacked_extra, quantizable, resident_bytes, rope_bytes, rope_dtype,
)
from .table import format_plan  # noqa: F401  (part of this module's API)
from ..model.spec import EmoSpec, check_context
from ..units import fmt_bytes

PLAN_VERSION = 2
OPTIMIZE = ("balanced", "quality", "speed")
# Provisional accuracy model for the auto search (see module docstring); replace with measured KL per component.
NOISE = {"fp32": 0.0, "fp16": 0.01, "int8": 1.0, "int4": 18.0}
SENSITIVITY = {"lm_head": 3.0, "attention": 2.0, "experts": 1.0, "embedding": 0.5, "kv_cache": 2.0}
KV_NOISE = {"float32": 0.0, "float16": 0.01, "int8": 1.0}  # the KV cache feeds attention: its sensitivity


@dataclass(frozen=True)
class ExportPlan:
    source_identity: str
    target: str
    experts: list  # per layer: sorted kept routed expert ids (source numbering), None for dense layers
    implicit: list  # per layer: shared / always-active expert ids (always kept; [] for none / dense)
    precision: dict  # attention, experts, embedding, lm_head -> fp32|fp16|int8|int4; router -> fp32
    layouts: dict  # component -> {"block_size", "symmetric", "scale_dtype"} used where it is int8/int4
    accuracy_level: int
    kv_cache_dtype: str  # float32 | float16 | int8: the graph's past/present type
    context: int
    budget: int | None
    bytes: dict  # file bytes per component, weights, weights_resident, kv_cache, overhead, total
    speed: dict  # the decode estimate: tok_s, bytes_per_token, context_tokens (emo_edge/plan/sizing.py)
    optimize: str  # balanced | quality | speed: how `auto` chose among fitting plans
    trimmed: list = field(default_factory=list)  # [{"layer", "expert", "score", "reason"}]
    notes: list = field(default_factory=list)
    version: int = PLAN_VERSION

    # ---- convenience for exporters -------------------------------------------------------------------
    def layer_experts(self, layer: int) -> list[int]:
        """The bundle's expert order for a MoE layer: kept routed experts, then the implicit ones."""
        kept = self.experts[layer]
        return [] if kept is None else list(kept) + list(self.implicit[layer])

    def quant_scheme(self, component: str, scale_dtype: str | None = None):
        """A `quant.QuantScheme` for an int8/int4 component (None for fp16/fp32); `scale_dtype` overrides the
        layout's (the MatMulNBits parts of the experts take scales of the activation dtype)."""
        p = self.precision[component]
        if p not in BITS:
            return None
        from ..quant import QuantScheme
        lay = self.layouts[component]
        return QuantScheme(bits=BITS[p], block_size=lay["block_size"], symmetric=lay["symmetric"],
                           scale_dtype=scale_dtype or lay["scale_dtype"], rounding=lay.get("rounding", "absmax"))

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
        kw["layouts"] = {c: dict(v) for c, v in d["layouts"].items()}
        kw["bytes"] = {k: int(v) for k, v in d["bytes"].items()}
        kw["speed"] = dict(d["speed"])
        kw["trimmed"] = [dict(t) for t in d["trimmed"]]
        kw["notes"] = list(d["notes"])
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> "ExportPlan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise BundleError(f"plan: not valid JSON ({exc})") from None


# ---- bytes and speed of one assignment --------------------------------------------------------------------
def weight_bytes(spec: EmoSpec, experts: Sequence[Sequence[int] | None], implicit: Sequence[Sequence[int]],
                 precision: Mapping[str, str], target, layouts: Mapping[str, dict] | None = None
                 ) -> tuple[dict[str, int], int]:
    """(file bytes per component, resident weight bytes, RoPE caches excluded) for kept `experts` (+ `implicit`)."""
    layouts = effective_layouts(spec, target) if layouts is None else layouts
    comp = component_bytes(spec, experts, implicit, precision, layouts, target)
    comp["rope"] = 0
    return comp, resident_bytes(comp, precision, target,
                                prepacked_extra(spec, experts, implicit, precision, layouts, target))


def _totals(spec, experts, implicit, precision, context, target, layouts) -> dict[str, int]:
    """Bytes of one search item: `precision` holds the four components and "kv_cache" (the KV dtype)."""
    kv = precision["kv_cache"]
    comp = component_bytes(spec, experts, implicit, precision, layouts, target)
    comp["rope"] = rope_bytes(spec, context, rope_dtype(spec, kv))
    if kv == "int8":  # GroupQueryAttention's static per-channel k_scale / v_scale, fp32 [kv_heads * head_dim]
        comp["kv_scales"] = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4
    out = dict(comp)
    out["weights"] = sum(comp.values())
    out["weights_resident"] = resident = resident_bytes(
        comp, precision, target, prepacked_extra(spec, experts, implicit, precision, layouts, target))
    out["kv_cache"] = kv_cache_bytes(spec, context, kv)
    out["overhead"] = target.overhead_bytes(resident, spec.vocab_size, spec.hidden_size)
    out["total"] = resident + out["kv_cache"] + out["overhead"]
    return out


def _estimate(spec, experts, implicit, precision, context, target, layouts, totals) -> dict:
    kv_tokens = min(context, target.speed.context_tokens)
    per_token = decode_bytes(spec, totals, precision, layouts, target, experts, implicit, kv_tokens,
                             precision["kv_cache"])  # bytes per kernel class
    return decode_estimate(spec, per_token, totals["weights_resident"], kv_tokens, target)


# ---- the search -----------------------------------------------------------------------------------------
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
    layouts = effective_layouts(spec, target)
    options = []
    for c in COMPONENTS:
        if c in fixed:
            if fixed[c] not in target.precisions_for(c):
                raise EmoEdgeError(f"target '{target.name}' cannot store {c} at {fixed[c]} "
                                   f"(allowed: {', '.join(target.precisions_for(c))})")
            if not quantizable(spec, c, fixed[c], layouts):
                raise EmoEdgeError(f"{c} cannot be {fixed[c]} with block size {layouts[c]['block_size']}: hidden "
                                   f"{spec.hidden_size} / intermediate {spec.intermediate_size} not divisible")
            options.append((fixed[c],))
        else:
            options.append(tuple(p for p in target.precisions_for(c) if quantizable(spec, c, p, layouts)))
    full = [list(layer.routed_experts) if layer.num_experts else None for layer in spec.layers]
    imp = [list(layer.implicit_experts) for layer in spec.layers]
    combos = [dict(zip(COMPONENTS, combo)) for combo in itertools.product(*options)]

    def key(pr):
        cost = sum(SENSITIVITY[c] * NOISE[pr[c]] for c in COMPONENTS)
        return (round(cost, 9), -weight_bytes(spec, full, imp, pr, target, layouts)[1],
                tuple(pr[c] for c in COMPONENTS))

    return sorted(combos, key=key)


def search_order(spec: EmoSpec, target, fixed: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """`candidates` x the KV cache dtypes each may use (`plan_bytes.kv_dtypes`), as search items (the four
    components + "kv_cache"), most accurate first: the KV dtype adds SENSITIVITY["kv_cache"] * KV_NOISE[dtype]
    to the assignment's cost; ties keep the candidates' order, then the KV dtypes' preference order."""
    items = []
    for rank, pr in enumerate(candidates(spec, target, fixed)):
        base = sum(SENSITIVITY[c] * NOISE[pr[c]] for c in COMPONENTS)
        for j, kv in enumerate(kv_dtypes(spec, pr, target)):
            items.append((round(base + SENSITIVITY["kv_cache"] * KV_NOISE[kv], 9), rank, j, {**pr, "kv_cache": kv}))
    return [it[3] for it in sorted(items, key=lambda it: it[:3])]


def _label(pr: Mapping[str, str]) -> str:
    """'int4/int4/int8/int4 (attention/experts/embedding/lm_head) + float16 KV cache'"""
    return ("/".join(pr[c] for c in COMPONENTS) + " (" + "/".join(COMPONENTS) + ")"
            + (f" + {pr['kv_cache']} KV cache" if "kv_cache" in pr else ""))


def choose(fitting: list[tuple[dict, dict]], optimize: str, fraction: float,
           enough: float = float("inf")) -> tuple[int, str | None]:
    """Index into `fitting` ((precision, speed estimate) pairs in search order) of the plan `optimize` picks,
    and a note when speed ruled out a more accurate plan (balanced) or picked a less accurate one (speed).
    balanced: the first whose estimate is >= fraction x the fastest's, or >= `enough` tok/s."""
    if optimize not in OPTIMIZE:
        raise EmoEdgeError(f"--optimize '{optimize}' is not one of {', '.join(OPTIMIZE)}")
    speeds = [est["tok_s"] for _, est in fitting]
    fastest = max(speeds)
    if optimize == "quality":
        return 0, None
    if optimize == "speed":
        i = speeds.index(fastest)
    else:
        i = next(j for j, v in enumerate(speeds) if v >= min(fraction * fastest, enough))
    if i == 0:
        return 0, None
    why = (f"below {fraction:.0%} of the fastest fitting plan's {fastest:.1f} tok/s" if optimize == "balanced"
           else f"slower than the fastest fitting plan's {fastest:.1f} tok/s")
    return i, (f"optimize {optimize}: the more accurate {_label(fitting[0][0])} "
               f"fits but is estimated at {speeds[0]:.1f} tok/s, {why}; chose {_label(fitting[i][0])} at "
               f"{speeds[i]:.1f} tok/s (--optimize quality keeps the most accurate)")


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
              expert_scores: Sequence[Mapping[int, float] | None] | None = None, identity: str = "",
              optimize: str = "balanced") -> ExportPlan:
    """Choose precisions (and, if needed, trim experts) so the bundle fits `budget_bytes` (None: no limit).

    pool_union: per layer, routed expert ids to keep (None: all); implicit experts are always kept.
    expert_scores: per layer {expert id: score} (higher = more important) used only for trimming.
    optimize: balanced | quality | speed (see the module docstring).
    Raises BudgetError (with the minimum) if even the smallest model does not fit."""
    from targets import get_target

    target = get_target(target)
    if optimize not in OPTIMIZE:
        raise EmoEdgeError(f"--optimize '{optimize}' is not one of {', '.join(OPTIMIZE)}")
    layouts = effective_layouts(spec, target)
    notes = [f"{c} block size {layouts[c]['block_size']} instead of the target's {target.layout(c).block_size}: "
             f"hidden {spec.hidden_size} / intermediate {spec.intermediate_size} are not multiples of it"
             for c in COMPONENTS if layouts[c]["block_size"] != target.layout(c).block_size]
    check_context(spec, context)  # a positive int <= spec.MAX_CONTEXT (RoPE tables and KV cache are sized by it)
    if budget_bytes is not None and budget_bytes <= 0:
        raise BudgetError(f"budget must be positive, got {budget_bytes}")
    fixed = _parse_precision(precision)
    kept = _normalise_pool(spec, pool_union)
    implicit = [list(layer.implicit_experts) for layer in spec.layers]
    if spec.max_position_embeddings and context > spec.max_position_embeddings:
        notes.append(f"context {context} exceeds the model's max_position_embeddings {spec.max_position_embeddings}")

    order = search_order(spec, target, fixed)
    fits = lambda b: budget_bytes is None or b["total"] <= budget_bytes  # noqa: E731
    # the target's layouts, then its fallback layouts (coarser blocks) before any expert is trimmed
    variants = [layouts] + [v for v in (effective_layouts(spec, target, f) for f in target.fallback_layouts)
                            if v != layouts]
    best = None  # (fastest estimate, layouts, totals_of, estimate, fitting, their estimates)
    for layouts in variants:
        totals_of = lambda e, pr: _totals(spec, e, implicit, pr, context, target, layouts)  # noqa: E731
        estimate = lambda e, pr, b: _estimate(spec, e, implicit, pr, context, target, layouts, b)  # noqa: E731
        fitting = [(pr, b) for pr in order for b in [totals_of(kept, pr)] if fits(b)]
        if not fitting:
            continue
        ests = [estimate(kept, pr, b) for pr, b in fitting]
        top = max(e["tok_s"] for e in ests)
        if best is None or top > best[0]:
            best = (top, layouts, totals_of, estimate, fitting, ests)
        if optimize != "speed":  # the first layout that fits; under speed every layout competes
            break
    if best is not None:
        _, layouts, totals_of, estimate, fitting, ests = best
    if layouts is not variants[0]:
        why = (": optimize speed, fewer bytes read per token (--optimize balanced keeps the target's more accurate "
               "layout)" if optimize == "speed" and fitting else
               ": the target's fallback layout, fewer resident bytes per weight"
               + (", so that every expert of the pool fits" if fitting else ", and still experts trimmed"))
        notes.append("layout " + ", ".join(f"{c} block {layouts[c]['block_size']} (instead of "
                                           f"{variants[0][c]['block_size']})" for c in COMPONENTS
                                           if layouts[c] != variants[0][c]) + why)
    trimmed: list[dict] = []
    if fitting:
        i, why = choose([(pr, e) for (pr, _), e in zip(fitting, ests)], optimize, target.speed.balanced_fraction,
                        target.speed.enough_tok_s)
        (chosen, totals), speed = fitting[i], ests[i]
        notes += [why] if why else []
    else:
        chosen, kept, trimmed, totals = _trim(spec, kept, implicit, order, totals_of, fits, expert_scores,
                                              budget_bytes, context)
        speed = estimate(kept, chosen, totals)
        per_layer: dict[int, int] = {}
        for t in trimmed:
            per_layer[t["layer"]] = per_layer.get(t["layer"], 0) + 1
        notes.append(f"even the smallest precisions ({_label(chosen)}) do not fit "
                     f"{fmt_bytes(budget_bytes)} with the full pool: "
                     f"trimmed {len(trimmed)} lowest-scored routed experts "
                     f"({', '.join(f'layer {l}: -{n}' for l, n in sorted(per_layer.items()))})"
                     + ("" if expert_scores else "; no expert scores given, so ties were broken by id"))
    if spec.tie_word_embeddings:
        notes.append("tied embeddings: the lm_head is stored as its own " + chosen["lm_head"] + " copy beside the "
                     "embedding's table (onnxruntime cannot share one initializer between Gather and MatMul)")
    if any(chosen[c] == "fp16" for c in COMPONENTS) and target.fp16_resident_bytes != 2:
        notes.append(f"fp16 weights are upcast at session start on target '{target.name}': "
                     f"{target.fp16_resident_bytes} bytes each resident")
    quantized = {c for c in COMPONENTS if chosen[c] in BITS}  # block sizes only matter to quantized weights
    notes = [n for n in notes if not n.endswith("not multiples of it") or n.split()[0] in quantized]
    kv = chosen["kv_cache"]
    if kv != kv_dtypes(spec, chosen, target)[0]:
        notes.append(f"KV cache {kv} (GroupQueryAttention's native int8 cache with static per-channel scales, "
                     f"calibrated at export): the {kv_dtypes(spec, chosen, target)[0]} cache would not fit or is "
                     f"ranked after it")
    precision_out = {c: chosen[c] for c in COMPONENTS}
    precision_out["router"] = "fp32"
    return ExportPlan(
        source_identity=identity, target=target.name, experts=[None if k is None else sorted(k) for k in kept],
        implicit=implicit, precision=precision_out, layouts=layouts, accuracy_level=target.accuracy_level,
        kv_cache_dtype=kv, context=context, budget=budget_bytes, bytes=totals, speed=speed,
        optimize=optimize, trimmed=trimmed, notes=notes)


def _trim(spec, kept, implicit, order, totals_of, fits, expert_scores, budget_bytes, context):
    """No assignment fits the full pool: the smallest assignment, trimming lowest-scored experts until it fits.
    Returns (precision, kept, trimmed, totals); BudgetError with the minimum if even routed_k per layer fails."""
    smallest = min(order, key=lambda pr: totals_of(kept, pr)["total"])
    minimum_pool = [None if k is None else _lowest_dropped(k, spec.layers[i].routed_k, expert_scores, i)
                    for i, k in enumerate(kept)]
    minimum = totals_of(minimum_pool, smallest)
    if not fits(minimum):
        prec = ", ".join(f"{c} {smallest[c]}" for c in COMPONENTS) + f", KV cache {smallest['kv_cache']}"
        raise BudgetError(
            f"budget {fmt_bytes(budget_bytes)} ({budget_bytes} bytes) cannot hold the minimum model: "
            f"{fmt_bytes(minimum['total'])} ({minimum['total']} bytes) = weights "
            f"{fmt_bytes(minimum['weights_resident'])} + KV cache at context {context} "
            f"{fmt_bytes(minimum['kv_cache'])} + runtime overhead {fmt_bytes(minimum['overhead'])} "
            f"({prec}; {_min_experts(spec)}). Raise --budget to at least "
            f"{fmt_bytes(minimum['total'])} or lower --context")
    kept = [None if k is None else list(k) for k in kept]
    trimmed: list[dict] = []
    totals = totals_of(kept, smallest)
    while not fits(totals):
        layer, expert, score = _next_to_trim(spec, kept, expert_scores)
        kept[layer].remove(expert)
        trimmed.append({"layer": layer, "expert": expert, "score": score, "reason": "budget"})
        totals = totals_of(kept, smallest)
    return smallest, kept, trimmed, totals


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
