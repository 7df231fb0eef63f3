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
    assert t.overhead_bytes(10**9, 100352, 2048) > t.overhead_bytes(10**8, 100352, 2048) > 0
    assert t.threads["inter_op"] >= 1


def test_unknown_target_lists_known():
    with pytest.raises(EmoEdgeError) as err:
        targets.get_target("riscv")
    for name in targets.TARGETS:
        assert name in str(err.value)
