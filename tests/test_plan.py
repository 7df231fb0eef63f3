"""The planner: byte accounting against independent arithmetic, auto choices, trimming, refusal, JSON."""

from __future__ import annotations

import json
import math

import pytest

from emo_edge.errors import BudgetError, EmoEdgeError
from emo_edge.plan import COMPONENTS, ExportPlan, candidates, format_plan, make_plan, matrix_bytes
from emo_edge.spec import spec_from_config
from emo_edge.synth import PRESETS, build_config
from targets import get_target

CPU = get_target("cpu")


def emo14b(layers=4, **overrides):
    return spec_from_config(build_config(PRESETS["emo-14b"], layers=layers, **overrides))


def pool32(spec):
    return [list(range(32)) for _ in spec.layers]


def int_bytes(n, k, bits, bs=32, scale=4):
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
    assert b["router"] == L * 33 * H * 4
    assert b["embedding"] == b["lm_head"] == int_bytes(V, H, 4)
    assert b["norms"] == (2 * L + 1) * H * 4
    assert b["rope"] == 2 * 4096 * 64 * 4
    assert b["weights"] == (attn + L * 33 * per_expert + L * 33 * H * 4 + 2 * int_bytes(V, H, 4) + (2 * L + 1) * H * 4
                            + b["rope"])
    assert b["kv_cache"] == 2 * L * 16 * hd * 4096 * 4
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


def test_tied_head_shares_bytes_at_same_precision():
    spec = emo14b(layers=1, tie_word_embeddings=True)
    assert make_plan(spec, None, None, 64, precision="int4").bytes["lm_head"] == 0
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


def test_auto_picks_first_fitting_plan():
    spec = emo14b()
    pool = pool32(spec)
    assert make_plan(spec, pool, None, 4096).precision["experts"] == "fp32"
    int4 = make_plan(spec, pool, None, 4096, precision="int4").bytes["total"]
    plan = make_plan(spec, pool, int4, 4096)
    assert plan.bytes["total"] <= int4 and not plan.trimmed
    assert {plan.precision[c] for c in COMPONENTS} == {"int4"}
    # a bit more budget buys something more accurate, still within budget
    roomy = make_plan(spec, pool, int4 + 60_000_000, 4096)
    assert roomy.bytes["total"] <= int4 + 60_000_000 and roomy.precision != plan.precision
    for budget in (2_000_000_000, 3_000_000_000, 5_000_000_000):
        p = make_plan(spec, pool, budget, 4096)
        assert p.bytes["total"] <= budget
        # every candidate before the chosen one overflows the budget
        order = candidates(spec, CPU)
        chosen = {c: p.precision[c] for c in COMPONENTS}
        for pr in order[:order.index(chosen)]:
            assert make_plan(spec, pool, None, 4096, precision=pr).bytes["total"] > budget


def test_trimming_lowest_scored_never_below_k():
    spec = emo14b()
    pool = pool32(spec)
    scores = [{e: float((e * 7 + layer) % 32) for e in range(32)} for layer in range(4)]
    int4 = make_plan(spec, pool, None, 4096, precision="int4").bytes["total"]
    per_expert = int_bytes(2048, 2048, 4) + int_bytes(2048, 1024, 4)
    budget = int4 - 10 * per_expert
    plan = make_plan(spec, pool, budget, 4096, expert_scores=scores)
    assert plan.bytes["total"] <= budget and plan.trimmed
    assert 1 <= len(plan.trimmed) <= 10
    # minimal: restoring the last trimmed expert overflows the budget
    last = plan.trimmed[-1]
    restored = [sorted(e + [last["expert"]]) if i == last["layer"] else e for i, e in enumerate(plan.experts)]
    assert make_plan(spec, restored, None, 4096, precision="int4").bytes["total"] > budget
    assert any("trimmed" in n for n in plan.notes)
    dropped = {(t["layer"], t["expert"]) for t in plan.trimmed}
    for layer in range(4):
        kept = plan.experts[layer]
        gone = [e for e in range(32) if (layer, e) in dropped]
        assert sorted(kept + gone) == list(range(32)) and kept == sorted(kept)
        if gone:  # only the lowest-scored go
            assert max(scores[layer][e] for e in gone) <= min(scores[layer][e] for e in kept)
    # the tightest budget that still holds the minimum: exactly routed_k routed experts everywhere
    minimum = make_plan(spec, [list(range(7))] * 4, None, 4096, precision="int4").bytes["total"]
    tight = make_plan(spec, pool, minimum, 4096, expert_scores=scores)
    assert [len(e) for e in tight.experts] == [7] * 4 and tight.implicit == [[127]] * 4
    for layer in range(4):
        assert tight.experts[layer] == sorted(sorted(range(32), key=lambda e: -scores[layer][e])[:7])


def test_refusal_states_minimum():
    spec = emo14b()
    minimum = make_plan(spec, [list(range(7))] * 4, None, 4096, precision="int4").bytes["total"]
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
    p = make_plan(spec, None, None, 64, precision="experts=int4")
    assert p.precision["experts"] == "int4" and p.precision["attention"] == "fp32"
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
    assert plan.quant_scheme("experts").bits == 4 and plan.quant_scheme("experts").block_size == 32
    table = format_plan(plan)
    for word in ("attention", "experts", "router", "embedding", "lm_head", "kv cache", "overhead", "total"):
        assert word in table
