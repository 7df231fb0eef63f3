"""The target registry: every target loads, is complete, and unknown names are explained."""

from __future__ import annotations

import pytest

import targets
from emo_edge.errors import EmoEdgeError


def test_registry_has_cpu_and_arm64():
    assert {"cpu", "arm64"} <= set(targets.TARGETS)
    assert targets.get_target().name == targets.DEFAULT_TARGET == "cpu"


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_target_complete(name):
    t = targets.get_target(name)
    assert t.name == name and t.block_size >= 16 and t.block_size & (t.block_size - 1) == 0
    for component in targets.COMPONENTS:
        assert t.precisions_for(component)
        for precision in t.precisions_for(component):
            thresholds = t.thresholds(precision)
            assert set(targets.VERIFY_METRICS) <= set(thresholds)
            assert 0 < thresholds["top1_agreement"] <= 1 and thresholds["kl"] > 0 and thresholds["ppl_ratio"] >= 1
    assert t.precisions_for("router") == ("fp32",)
    assert t.supports("MatMulNBits") and not t.supports("NoSuchOp")
    assert t.kv_bytes_per_element in (2, 4) and t.scale_bytes in (2, 4)
    assert t.overhead_bytes(10**9, 100352, 2048) >= t.overhead_bytes(10**8, 100352, 2048) > 0
    assert t.threads["inter_op"] >= 1


def test_unknown_target_lists_known():
    with pytest.raises(EmoEdgeError) as err:
        targets.get_target("riscv")
    for name in targets.TARGETS:
        assert name in str(err.value)


def test_layouts_and_speed_schema(tmp_path):
    """Per-component layouts override the default one; a float16 scale is refused where the operator is a
    MatMulNBits (its scales must be of the activation type); the speed model's fields are typed."""
    import json

    from targets import _DIR, FP16_SCALE_COMPONENTS, Layout, load_target

    good = json.loads((_DIR / "cpu.json").read_text())
    f = tmp_path / "cpu.json"
    f.write_text(json.dumps({**good, "layouts": {"experts": {"block_size": 32, "symmetric": False,
                                                              "scale_dtype": "float16"}}}))
    t = load_target(f)
    assert t.layout("experts") == Layout(32, False, "float16")
    assert t.layout("attention") == Layout(good["block_size"], good["symmetric"], good["scale_dtype"])
    assert set(FP16_SCALE_COMPONENTS) == {"experts", "embedding"}
    for change, needle in [({"layouts": {"attention": {"block_size": 64, "symmetric": True, "scale_dtype": "float16"}}},
                            "layouts.attention"),
                           ({"layouts": {"mlp": {"block_size": 64, "symmetric": True, "scale_dtype": "float32"}}},
                            "unknown component"),
                           ({"layouts": {"experts": {"block_size": 48, "symmetric": True, "scale_dtype": "float32"}}},
                            "power of two"),
                           ({"scale_dtype": "float16"}, "the default layout"),
                           ({"speed": {**good["speed"], "balanced_fraction": 1.5}}, "balanced_fraction"),
                           ({"speed": {**good["speed"], "bandwidth": {"fp32": 1, "int8": 1}}}, "bandwidth.int4"),
                           ({"kv_cache_dtype": "int4"}, "kv_cache_dtype")]:
        f.write_text(json.dumps({**good, **change}))
        with pytest.raises(EmoEdgeError) as err:
            load_target(f)
        assert str(f) in str(err.value) and needle in str(err.value), str(err.value)


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_speed_model_is_complete(name):
    s = targets.get_target(name).speed
    assert set(s.bandwidth) == {"fp32", "int8", "int4"} and all(v > 0 for v in s.bandwidth.values())
    assert 0 < s.balanced_fraction <= 1 and s.layer_s > 0 and s.context_tokens > 0 and s.enough_tok_s > 0
