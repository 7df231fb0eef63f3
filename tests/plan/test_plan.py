"""The planner: byte accounting against independent arithmetic, auto choices, trimming, refusal, JSON."""

from __future__ import annotations

import json
import math

import pytest

from emo_edge.errors import BudgetError, EmoEdgeError
from emo_edge.plan.search import COMPONENTS, ExportPlan, candidates, format_plan, make_plan, matrix_bytes
from emo_edge.model.spec import spec_from_config
from emo_edge.model.synth import PRESETS, build_config
from targets import get_target

CPU = get_target("cpu")


def emo14b(layers=4, **overrides):
    return spec_from_config(build_config(PRESETS["emo-14b"], layers=layers, **overrides))


def pool32(spec):
    return [list(range(32)) for _ in spec.layers]


BS = CPU.block_size  # the cpu target's layout: one block size for every component, symmetric, fp32 scales


def int_bytes(n, k, bits, bs=BS, scale=4):
    """Independent arithmetic: codes + fp32 scales, symmetric (no zero points)."""
    blocks = math.ceil(k / bs)
    return n * blocks * bs * bits // 8 + n * blocks * scale


def test_matrix_bytes_layouts():
    assert matrix_bytes(10, 64, "fp16") == 10 * 64 * 2
    assert matrix_bytes(10, 64, "int4") == 10 * 64 // 2 + 10 * 2 * 4
    assert matrix_bytes(10, 64, "int8") == 10 * 64 + 10 * 2 * 4
    # K padded to whole blocks; asymmetric adds packed zero points (3 blocks -> 2 bytes at int4)
    assert matrix_bytes(1, 70, "int4", symmetric=False) == 3 * 16 + 3 * 4 + 2
    assert matrix_bytes(1, 70, "int8", symmetric=False) == 3 * 32 + 3 * 4 + 3


def test_emo14b_int4_bytes_match_independent_arithmetic():
    spec = emo14b()
    plan = make_plan(spec, pool32(spec), None, 4096, "cpu", precision="int4")
    H, I, V, L, hd = 2048, 1024, 100352, 4, 128
    q = kv = 16 * hd
    attn = L * (int_bytes(q, H, 4) + 2 * int_bytes(kv, H, 4) + int_bytes(H, q, 4))
    per_expert = int_bytes(2 * I, H, 4) + int_bytes(H, I, 4)
    b = plan.bytes
    assert b["attention"] == attn
    assert b["experts"] == L * 33 * per_expert  # 32 routed + 1 shared
    assert b["router"] == L * 32 * H * 4  # the one shared expert has weight 1: no router row in the bundle
    assert b["embedding"] == b["lm_head"] == int_bytes(V, H, 4)
    assert b["norms"] == (2 * L + 1) * H * 4
    assert b["rope"] == 2 * 4096 * 64 * 2  # fp16 caches: GroupQueryAttention runs in the fp16 KV dtype
    assert b["weights"] == (attn + L * 33 * per_expert + L * 32 * H * 4 + 2 * int_bytes(V, H, 4) + (2 * L + 1) * H * 4
                            + b["rope"])
    assert plan.kv_cache_dtype == CPU.kv_cache_dtype == "float16"
    assert b["kv_cache"] == 2 * L * 16 * hd * 4096 * 2
    # resident: MLAS's prepacked MatMulNBits/QMoE blocks hold a float32 scale and a float32 block sum (8 bytes)
    # where the file holds a float32 scale; the embedding (GatherBlockQuantized) stays as in the file
    blocks = L * (q * H + 2 * kv * H + H * q) // BS + L * 33 * (2 * I * H + H * I) // BS + V * H // BS
    assert b["weights_resident"] == b["weights"] + 4 * blocks
    assert b["overhead"] == CPU.overhead_bytes(b["weights_resident"], V, H)
    assert b["total"] == b["weights_resident"] + b["kv_cache"] + b["overhead"]
    assert plan.precision == {"attention": "int4", "experts": "int4", "embedding": "int4", "lm_head": "int4",
                              "router": "fp32"}
    assert plan.experts == pool32(spec) and plan.implicit == [[127]] * L


def test_fp16_bytes_and_residency():
    spec = emo14b(layers=2)
    plan = make_plan(spec, pool32(spec), None, 128, "cpu", precision="fp16")
    b = plan.bytes
    assert b["embedding"] == 100352 * 2048 * 2
    fp16 = b["attention"] + b["experts"] + b["embedding"] + b["lm_head"]
    assert b["weights_resident"] == fp16 * CPU.fp16_resident_bytes // 2 + b["router"] + b["norms"] + b["rope"]


def test_tied_head_is_its_own_copy():
    """The exporter writes the head's MatMulNBits/Gemm weight beside the embedding's Gather table (onnxruntime
    cannot share one initializer between them), so a tied head costs its own bytes (tests/export/test_export.py checks
    the plan's file bytes against a real bundle)."""
    spec = emo14b(layers=1, tie_word_embeddings=True)
    plan = make_plan(spec, None, None, 64, precision="int4")
    assert plan.bytes["lm_head"] == plan.bytes["embedding"] == int_bytes(100352, 2048, 4)
    assert any("own int4 copy" in n for n in plan.notes)
    mixed = make_plan(spec, None, None, 64, precision={"embedding": "int4", "lm_head": "int8", "attention": "int4",
                                                      "experts": "int4"})
    assert mixed.bytes["lm_head"] == int_bytes(100352, 2048, 8)


def test_auto_order_is_most_accurate_first():
    spec = emo14b()
    order = candidates(spec, CPU)
    assert order[0] == dict.fromkeys(COMPONENTS, "fp32")
    assert order[-1] == dict.fromkeys(COMPONENTS, "int4")
    assert len(order) == 4 ** 4
    # the first step down touches the least sensitive component
    assert order[1] == {"attention": "fp32", "experts": "fp32", "embedding": "fp16", "lm_head": "fp32"}
    # among the float-free plans, the first int8 step is again the least sensitive component
    no_fp32 = [o for o in order if "fp32" not in o.values()]
    assert no_fp32[0] == dict.fromkeys(COMPONENTS, "fp16")
    assert no_fp32[1] == {"attention": "fp16", "experts": "fp16", "embedding": "int8", "lm_head": "fp16"}


SMALLEST = {**dict.fromkeys(COMPONENTS, "int4"), "kv_cache": "int8"}


def _item_total(spec, pool, item, context=4096, fallback=False, which=-1):
    """Total bytes of one search item (four precisions + "kv_cache") with the full pool, at the target's layouts
    or (`fallback`) its fallback layouts `which` (default the last: the coarsest, where the planner trims)."""
    from emo_edge.plan.search import _totals
    from emo_edge.plan.sizing import effective_layouts
    implicit = [list(layer.implicit_experts) for layer in spec.layers]
    lay = effective_layouts(spec, CPU, CPU.fallback_layouts[which] if fallback else None)
    return _totals(spec, pool, implicit, item, context, CPU, lay)["total"]


def test_fallback_layout_keeps_every_expert_before_trimming():
    """Where the full pool fits no assignment at the target's layouts, the planner takes its fallback layout
    (experts block 128: fewer resident bytes per weight) before it trims an expert, and says so: the first
    fallback that fits (the experts' coarser block before every component's)."""
    spec = emo14b()
    pool = pool32(spec)
    at_default = _item_total(spec, pool, SMALLEST)
    at_fallback = _item_total(spec, pool, SMALLEST, fallback=True, which=0)
    assert _item_total(spec, pool, SMALLEST, fallback=True) < at_fallback
    assert at_fallback < at_default
    plan = make_plan(spec, pool, at_default - 1, 4096)
    assert not plan.trimmed and plan.experts == pool and plan.bytes["total"] == at_fallback
    assert plan.layouts["experts"]["block_size"] == CPU.fallback_layouts[0]["experts"].block_size == 128
    assert plan.layouts["attention"]["block_size"] == CPU.block_size
    assert any("fallback layout" in n and "every expert" in n for n in plan.notes)
    roomy = make_plan(spec, pool, at_default, 4096)
    assert roomy.layouts["experts"]["block_size"] == CPU.block_size and not any("fallback" in n for n in roomy.notes)


def test_search_order_adds_the_kv_cache_dtype():
    """Each assignment is tried with its KV dtypes, the target's preferred one first; all-fp32 only with fp32."""
    from emo_edge.plan.search import search_order
    spec = emo14b()
    order = search_order(spec, CPU)
    assert order[0] == {**dict.fromkeys(COMPONENTS, "fp32"), "kv_cache": "float32"}
    assert sum(1 for o in order if o["kv_cache"] == "float32") == 1
    int4 = [o for o in order if all(o[c] == "int4" for c in COMPONENTS)]
    assert [o["kv_cache"] for o in int4] == list(CPU.kv_cache_dtypes) == ["float16", "int8"]
    assert len(order) == (4 ** 4 - 1) * len(CPU.kv_cache_dtypes) + 1
    plain = emo14b(head_dim=72)  # no GroupQueryAttention (head_dim % 16): no int8 cache
    assert {o["kv_cache"] for o in search_order(plain, CPU)} == {"float32", "float16"}


def test_auto_quality_picks_first_fitting_plan():
    from emo_edge.plan.search import search_order
    spec = emo14b()
    pool = pool32(spec)
    assert make_plan(spec, pool, None, 4096, optimize="quality").precision["experts"] == "fp32"
    int4 = make_plan(spec, pool, None, 4096, precision="int4")
    assert int4.kv_cache_dtype == "float16"
    plan = make_plan(spec, pool, int4.bytes["total"], 4096, precision="int4", optimize="quality")
    assert plan.bytes == int4.bytes and plan.kv_cache_dtype == "float16" and not plan.trimmed
    tight = make_plan(spec, pool, int4.bytes["total"] - 1, 4096, precision="int4", optimize="quality")
    assert tight.kv_cache_dtype == "int8" and not tight.trimmed  # the int8 cache before trimming any expert
    assert any(n.startswith("KV cache int8") for n in tight.notes)
    # a bit more budget buys something more accurate, still within budget
    roomy = make_plan(spec, pool, int4.bytes["total"] + 60_000_000, 4096, optimize="quality")
    assert roomy.bytes["total"] <= int4.bytes["total"] + 60_000_000 and roomy.precision != plan.precision
    order = search_order(spec, CPU)
    for budget in (2_000_000_000, 3_000_000_000, 5_000_000_000):
        p = make_plan(spec, pool, budget, 4096, optimize="quality")
        assert p.bytes["total"] <= budget
        # every search item before the chosen one overflows the budget
        chosen = {**{c: p.precision[c] for c in COMPONENTS}, "kv_cache": p.kv_cache_dtype}
        assert _item_total(spec, pool, chosen) == p.bytes["total"]
        for item in order[:order.index(chosen)]:
            assert _item_total(spec, pool, item) > budget


def test_trimming_lowest_scored_never_below_k():
    spec = emo14b()
    pool = pool32(spec)
    scores = [{e: float((e * 7 + layer) % 32) for e in range(32)} for layer in range(4)]
    int4 = _item_total(spec, pool, SMALLEST, fallback=True)  # the smallest item: int4, int8 KV, coarsest layout
    per_expert = int_bytes(2048, 2048, 4, 128) + int_bytes(2048, 1024, 4, 128)
    budget = int4 - 10 * per_expert
    plan = make_plan(spec, pool, budget, 4096, expert_scores=scores)
    assert plan.bytes["total"] <= budget and plan.trimmed
    assert 1 <= len(plan.trimmed) <= 10
    # minimal: restoring the last trimmed expert overflows the budget
    last = plan.trimmed[-1]
    restored = [sorted(e + [last["expert"]]) if i == last["layer"] else e for i, e in enumerate(plan.experts)]
    assert _item_total(spec, restored, SMALLEST, fallback=True) > budget
    assert any("trimmed" in n for n in plan.notes) and plan.kv_cache_dtype == "int8"
    dropped = {(t["layer"], t["expert"]) for t in plan.trimmed}
    for layer in range(4):
        kept = plan.experts[layer]
        gone = [e for e in range(32) if (layer, e) in dropped]
        assert sorted(kept + gone) == list(range(32)) and kept == sorted(kept)
        if gone:  # only the lowest-scored go
            assert max(scores[layer][e] for e in gone) <= min(scores[layer][e] for e in kept)
    # the tightest budget that still holds the minimum: exactly routed_k routed experts everywhere
    minimum = _item_total(spec, [list(range(7))] * 4, SMALLEST, fallback=True)
    tight = make_plan(spec, pool, minimum, 4096, expert_scores=scores)
    assert [len(e) for e in tight.experts] == [7] * 4 and tight.implicit == [[127]] * 4
    for layer in range(4):
        assert tight.experts[layer] == sorted(sorted(range(32), key=lambda e: -scores[layer][e])[:7])


def test_refusal_states_minimum():
    spec = emo14b()
    minimum = _item_total(spec, [list(range(7))] * 4, SMALLEST, fallback=True)
    with pytest.raises(BudgetError) as err:
        make_plan(spec, pool32(spec), minimum - 1, 4096)
    assert str(minimum) in str(err.value) and "minimum" in str(err.value)
    assert isinstance(err.value, EmoEdgeError)


def test_explicit_precision_and_errors():
    spec = emo14b(layers=1)
    with pytest.raises(EmoEdgeError, match="router is always fp32"):
        make_plan(spec, None, None, 64, precision={"router": "int4"})
    with pytest.raises(EmoEdgeError, match="unknown component"):
        make_plan(spec, None, None, 64, precision="mlp=int4")
    p = make_plan(spec, None, None, 64, precision="experts=int4", optimize="quality")
    assert p.precision["experts"] == "int4" and p.precision["attention"] == "fp32"
    for optimize in ("balanced", "speed"):  # a fixed component is never searched
        assert make_plan(spec, None, None, 64, precision="experts=int8", optimize=optimize).precision["experts"] == "int8"
    with pytest.raises(EmoEdgeError, match="--optimize 'fast'"):
        make_plan(spec, None, None, 64, optimize="fast")
    with pytest.raises(EmoEdgeError, match="each token needs"):
        make_plan(spec, [[1, 2]], None, 64)
    with pytest.raises(EmoEdgeError, match="unknown target"):
        make_plan(spec, None, None, 64, target="gpu9000")


def test_json_round_trip_and_table():
    spec = emo14b()
    plan = make_plan(spec, pool32(spec), 1_000_000_000, 2048, identity="abc123")
    again = ExportPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and ExportPlan.from_json(plan.to_json()) == plan
    assert plan.layer_experts(0) == plan.experts[0] + [127]
    # trimmed at 1 GB, so at the coarsest (last fallback) layout: every component block 128
    assert plan.trimmed and plan.quant_scheme("experts").bits == 4 and plan.quant_scheme("experts").block_size == 128
    assert BS == 64 and {plan.quant_scheme(c).block_size for c in ("attention", "embedding", "lm_head")} == {128}
    assert plan.quant_scheme("experts") == plan.quant_scheme("experts", "float32")
    table = format_plan(plan)
    for word in ("attention", "experts", "router", "embedding", "lm_head", "kv cache", "overhead", "total"):
        assert word in table
    assert f"{plan.speed['tok_s']:.1f} tok/s" in table and "decode" in table


# ---- KV cache dtype, layouts, speed ------------------------------------------------------------------------
def test_kv_cache_dtype_follows_the_plan():
    """All-fp32 plans keep a float32 cache (exact against the reference); any other plan uses the target's."""
    spec = emo14b(layers=2)
    exact = make_plan(spec, None, None, 1000, precision="fp32")
    assert exact.kv_cache_dtype == "float32" and exact.bytes["kv_cache"] == 2 * 2 * 16 * 128 * 1000 * 4
    assert exact.bytes["rope"] == 2 * 1000 * 64 * 4
    for precision in ("fp16", "int8", "experts=int4,attention=fp32,embedding=fp32,lm_head=fp32"):
        p = make_plan(spec, None, None, 1000, precision=precision)
        assert p.kv_cache_dtype == "float16" and p.bytes["kv_cache"] == 2 * 2 * 16 * 128 * 1000 * 2, precision
        assert p.bytes["rope"] == 2 * 1000 * 64 * 2


def test_layouts_lower_the_block_only_where_the_operator_needs_it():
    """QMoE needs hidden and intermediate divisible by the block, GatherBlockQuantized the hidden size;
    MatMulNBits pads K, so attention and lm_head keep the target's block."""
    spec = emo14b(layers=1, intermediate_size=80, hidden_size=192, num_attention_heads=3, num_key_value_heads=3)
    plan = make_plan(spec, None, None, 64, precision="int4")
    assert plan.layouts["experts"]["block_size"] == 16  # 80 = 5 x 16
    assert plan.layouts["embedding"]["block_size"] == 64  # 192 = 3 x 64
    assert plan.layouts["attention"]["block_size"] == plan.layouts["lm_head"]["block_size"] == BS
    assert any(n.startswith("experts block size 16") for n in plan.notes)
    H, I, V = 192, 80, 100352
    per_expert = int_bytes(2 * I, H, 4, 16) + int_bytes(H, I, 4, 16)
    assert plan.bytes["experts"] == 128 * per_expert  # 127 routed + 1 shared, all at block 16 (implicit too)
    assert plan.bytes["embedding"] == int_bytes(V, H, 4, 64)
    assert plan.bytes["lm_head"] == int_bytes(V, H, 4, BS)


def test_fp16_expert_scales_shrink_the_file_not_the_resident_bytes():
    """A target whose experts take float16 scales (QMoE) and asymmetric blocks: the routed experts' file bytes use
    2-byte scales and packed zero points, the shared expert (MatMulNBits) keeps fp32 scales, and the resident
    bytes charge the routed experts' scales at 4 bytes (QMoE's prepacking keeps float32 scales)."""
    import dataclasses

    from targets import Layout

    spec = emo14b(layers=1)
    lay = Layout(64, False, "float16")
    tgt = dataclasses.replace(CPU, layouts={"experts": lay})
    plan = make_plan(spec, pool32(spec), None, 64, tgt, precision="int4")
    H, I = 2048, 1024

    def asym(n, k, scale):  # codes + scales + one packed 4-bit zero point per block
        nb = k // 64
        return n * nb * 32 + n * nb * scale + n * math.ceil(nb / 2)

    routed16, routed32 = (asym(2 * I, H, s) + asym(H, I, s) for s in (2, 4))
    shared = asym(2 * I, H, 4) + asym(H, I, 4)
    assert plan.layouts["experts"] == {"block_size": 64, "symmetric": False, "scale_dtype": "float16", "rounding": "search"}
    assert plan.bytes["experts"] == 32 * routed16 + shared
    fp32_scales = make_plan(spec, pool32(spec), None, 64, dataclasses.replace(
        CPU, layouts={"experts": Layout(64, False, "float32")}), precision="int4")
    assert plan.bytes["weights_resident"] == fp32_scales.bytes["weights_resident"]
    assert plan.bytes["weights"] == fp32_scales.bytes["weights"] - 32 * (routed32 - routed16)


def _decode_seconds(spec, plan, target):
    """Independent arithmetic of the speed model (emo_edge/plan/sizing.py docstring) for a plan of this module's
    emo14b shapes (one shared expert, top-8)."""
    H, I, V, L = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.num_layers
    bits = {"int8": 8, "int4": 4}
    lay = plan.layouts

    def w(n, k, prec, c):
        if prec in ("fp32", "fp16"):
            return n * k * 4  # fp16 runs as the fp32 copy onnxruntime folds it to
        return int_bytes(n, k, bits[prec], lay[c]["block_size"])

    cls = lambda p: "fp32" if p in ("fp32", "fp16") else p  # noqa: E731
    p = plan.precision
    reads = {}
    add = lambda c, b: reads.__setitem__(cls(c), reads.get(cls(c), 0) + b)  # noqa: E731
    add(p["attention"], L * (4 * w(H, H, p["attention"], "attention")))
    add(p["experts"], L * 8 * (w(2 * I, H, p["experts"], "experts") + w(H, I, p["experts"], "experts")))
    add(p["embedding"], w(V, H, p["embedding"], "embedding") // V)
    add(p["lm_head"], w(V, H, p["lm_head"], "lm_head"))
    kv = 2 * L * 16 * 128 * min(plan.context, target.speed.context_tokens) * (4 if plan.kv_cache_dtype == "float32" else 2)
    add("fp32", plan.bytes["router"] + plan.bytes["norms"] + kv)
    miss = 1 - min(1, target.speed.cache_bytes / plan.bytes["weights_resident"])
    return L * target.speed.layer_s + sum(miss * b / target.speed.bandwidth[c] for c, b in reads.items())


@pytest.mark.parametrize("precision", ["int4", "int8", "fp32", "fp16",
                                       "attention=int8,experts=int4,embedding=fp32,lm_head=int4"])
def test_speed_estimate_matches_independent_arithmetic(precision):
    spec = emo14b(layers=2)
    plan = make_plan(spec, pool32(spec), None, 4096, precision=precision)
    assert plan.speed["tok_s"] == pytest.approx(1 / _decode_seconds(spec, plan, CPU), abs=5e-4)  # rounded to 3 places
    assert plan.speed["context_tokens"] == CPU.speed.context_tokens


def _item_speed(spec, pool, item, context=4096, layout=None):
    from emo_edge.plan.search import _estimate, _totals
    from emo_edge.plan.sizing import effective_layouts
    implicit = [list(layer.implicit_experts) for layer in spec.layers]
    lay = effective_layouts(spec, CPU, layout)
    return _estimate(spec, pool, implicit, item, context, CPU, lay,
                     _totals(spec, pool, implicit, item, context, CPU, lay))["tok_s"]


def test_auto_balanced_quality_speed():
    """Among the search items that fit (same experts): speed = the fastest estimate, quality = the most accurate,
    balanced = the most accurate at >= balanced_fraction of the fastest; every more accurate fitting item is
    estimated slower than that, and the plan says why."""
    from emo_edge.plan.search import search_order
    spec = emo14b(layers=2)
    pool = pool32(spec)
    budget = 4_000_000_000
    fitting = [it for it in search_order(spec, CPU) if _item_total(spec, pool, it) <= budget]
    est = [_item_speed(spec, pool, it) for it in fitting]
    fastest = max(est)
    plans = {o: make_plan(spec, pool, budget, 4096, optimize=o) for o in ("balanced", "quality", "speed")}
    key = lambda p: {**{c: p.precision[c] for c in COMPONENTS}, "kv_cache": p.kv_cache_dtype}  # noqa: E731
    assert key(plans["quality"]) == fitting[0]
    # speed also searches the fallback layouts (coarser blocks: fewer bytes per token); here every component's
    # block 128 is the fastest, the most accurate of the items at that estimate
    coarse = CPU.fallback_layouts[-1]
    coarse_est = [_item_speed(spec, pool, it, layout=coarse) for it in fitting]
    assert max(coarse_est) > fastest
    assert plans["speed"].speed["tok_s"] == max(coarse_est)
    assert key(plans["speed"]) == fitting[coarse_est.index(max(coarse_est))]
    assert {plans["speed"].layouts[c]["block_size"] for c in COMPONENTS} == {128}
    assert any("optimize speed, fewer bytes read per token" in n for n in plans["speed"].notes)
    assert {plans[o].layouts["experts"]["block_size"] for o in ("balanced", "quality")} == {CPU.block_size}
    b = plans["balanced"]
    assert fastest * CPU.speed.balanced_fraction <= b.speed["tok_s"] < CPU.speed.enough_tok_s
    i = fitting.index(key(b))
    assert i > 0 and all(v < fastest * CPU.speed.balanced_fraction for v in est[:i])
    assert any(n.startswith("optimize balanced: the more accurate") for n in b.notes)
    assert b.optimize == "balanced" and all(p.bytes["total"] <= budget and not p.trimmed for p in plans.values())
    # the 2-layer slice's old default (most accurate that fits: int8/fp32 at 4 GB) was ~3x slower than int4
    assert plans["quality"].speed["tok_s"] < 0.5 * fastest


def test_auto_balanced_keeps_accuracy_where_decode_is_fast_enough():
    """A model that decodes faster than enough_tok_s at every precision (emo-tiny's size) keeps the most accurate
    plan: speed only rules where it is scarce."""
    spec = spec_from_config(build_config(PRESETS["small"]))
    plan = make_plan(spec, None, 4_000_000_000, 1024)
    assert plan.speed["tok_s"] >= CPU.speed.enough_tok_s
    assert plan.precision == make_plan(spec, None, 4_000_000_000, 1024, optimize="quality").precision
    assert {plan.precision[c] for c in COMPONENTS} == {"fp32"} and plan.kv_cache_dtype == "float32"
