"""ort_session.cpu_session releases the external-data pages that loading leaves resident (the block scales of
prepacked MatMulNBits weights, never read again) and computes exactly what it computed before.

The graph: one int4 MatMulNBits [2048 x 2048] (block 32, accuracy_level 4) with its weights and scales in an
external data file, so onnxruntime maps them, prepacks B and keeps the scales mapped (what bench/residency.py
measures on real bundles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emo_edge.engine.ort_session import _clean_mappings, cpu_session, release_external_data
from emo_edge.quant import QuantScheme, dequantize, quantize_blockwise

N = K = 2048


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> tuple[Path, np.ndarray]:
    import onnx
    from onnx import TensorProto, helper

    from exporters import ort_ops

    rng = np.random.default_rng(0)
    qt = quantize_blockwise(rng.standard_normal((N, K)).astype(np.float32), QuantScheme(bits=4, block_size=32))
    nodes, inits, y = ort_ops.matmul_nbits("/m", "x", qt, 4)
    nodes.append(helper.make_node("Identity", [y], ["y"]))
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    d = tmp_path_factory.mktemp("residency")
    onnx.save_model(model, str(d / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=1024)
    return d / "m.onnx", dequantize(qt)


def _resident(data: Path) -> int:
    return sum(r for _, _, r in _clean_mappings({str(data.resolve())}))


def _options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return so


def test_release_drops_the_pages_loading_left_and_changes_no_result(graph):
    path, w = graph
    data = path.with_name("m.onnx.data")
    x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)

    kept = cpu_session(str(path), _options(), release=False)
    left = _resident(data)
    assert left >= N * (K // 32) * 4  # the fp32 scales, touched while prepacking, stay resident
    y_kept = kept.run(None, {"x": x})[0]

    released = cpu_session(str(path), _options())  # the default
    assert _resident(data) == 0  # both sessions' mappings: every page dropped
    y = released.run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, y_kept)  # only residency changed
    assert _resident(data) == 0  # running never reads the scales again
    # and the result is the int4 product (accuracy_level 4 quantizes x to int8 per block: a loose check)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    assert np.abs(y - ref).max() <= 0.02 * np.abs(ref).max()
    assert release_external_data(path) == 0  # idempotent: nothing left to drop


def test_release_never_touches_other_files(graph, tmp_path):
    path, _ = graph
    other = tmp_path / "other.bin"
    other.write_bytes(np.arange(1 << 20, dtype=np.uint8).tobytes())
    mm = np.memmap(other, np.uint8, "r")
    assert int(mm.sum()) > 0  # every page touched
    before = _resident(other)
    cpu_session(str(path), _options())
    assert _resident(other) == before > 0
    del mm
