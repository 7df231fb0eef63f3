"""The static engine: manifest and sha256 checks, pool checks, sampling, onnxruntime-genai."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import genai_greedy

CTX = 48


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, variant):
    from emo_edge.export.pipeline import export
    out = tmp_path_factory.mktemp("bundle") / "b"
    export(variant("shared1"), "all", None, CTX, "cpu", "fp32", out, False, False, progress=False)
    return out


def test_manifest_lists_every_file_with_sha256(bundle_dir):
    from emo_edge.bundle.files import sha256_file
    m = json.loads((bundle_dir / "manifest.json").read_text())
    on_disk = {p.name for p in bundle_dir.iterdir()} - {"manifest.json"}
    assert set(m["files"]) == on_disk
    for name, e in m["files"].items():
        assert e["sha256"] == sha256_file(bundle_dir / name)
    assert m["schema_version"] == 1 and m["emo_edge_version"]
    layer0 = m["experts"][0]
    assert layer0["routed_bundle_ids"] == list(range(len(layer0["routed_source_ids"])))
    cfg = json.loads((bundle_dir / "genai_config.json").read_text())["model"]
    assert cfg["type"] == "decoder" and cfg["context_length"] == CTX and cfg["vocab_size"] == 512


def test_corrupt_or_missing_files_refused(bundle_dir, tmp_path):
    from emo_edge.engine import StaticEngine
    from emo_edge.errors import BundleError
    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    data = bytearray((bad / "model.onnx.data").read_bytes())
    data[1000] ^= 0xFF
    (bad / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        StaticEngine(bad)
    (bad / "model.onnx.data").unlink()
    with pytest.raises(BundleError, match="missing"):
        StaticEngine(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not a bundle"):
        StaticEngine(bad)


def test_pool_must_match_bundle(bundle_dir, tmp_path):
    from emo_edge.bundle.files import pool_matches
    from emo_edge.engine import StaticEngine
    from emo_edge.errors import BundleError
    m = StaticEngine(bundle_dir).manifest
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"layers": [r["routed_source_ids"] for r in m["experts"]]}))
    pool_matches(m, same)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"layers": [r["routed_source_ids"][:3] for r in m["experts"]]}))
    with pytest.raises(BundleError, match="layer 0"):
        pool_matches(m, other)


def test_context_limit_and_sampling(bundle_dir):
    from emo_edge.engine import Sampling, StaticEngine, sample
    from emo_edge.errors import BundleError
    b = StaticEngine(bundle_dir)
    with pytest.raises(BundleError, match="context"):
        b.logits(list(range(CTX + 1)))
    s = Sampling(6, temperature=0.9, top_p=0.8, seed=3, ignore_eos=True)
    a, c = b.generate([5, 6, 7], sampling=s).ids, b.generate([5, 6, 7], sampling=s).ids
    assert a == c and len(a) == 6
    logits = np.array([0.0, 10.0, 0.0])
    assert sample(logits, 0.0, 1.0, np.random.default_rng(0)) == 1
    assert sample(logits, 1.0, 0.5, np.random.default_rng(0)) == 1  # nucleus keeps only the top token


def test_onnxruntime_genai_runs_bundle_unchanged(bundle_dir):
    og = pytest.importorskip("onnxruntime_genai")
    from emo_edge.engine import StaticEngine
    ids = [5, 17, 99, 3]
    seq = genai_greedy(og, bundle_dir, ids, 20)
    ours = StaticEngine(bundle_dir).generate(ids, max_tokens=len(seq) - len(ids), ignore_eos=True).ids
    assert seq == ids + ours


def test_chunked_prefill_equals_one_shot(bundle_dir):
    from emo_edge.engine import Sampling, StaticEngine

    b = StaticEngine(bundle_dir)
    prompt = [5, 17, 99, 3, 250, 42, 7, 11, 300, 2]
    one_shot = b.session().feed(prompt)
    s = b.session()
    s.prefill_chunk = 3
    chunked = s.prefill(prompt)
    assert s.length == len(prompt) and chunked.shape[0] == 1  # the last chunk: one token
    np.testing.assert_allclose(chunked[-1], one_shot[-1], rtol=0, atol=1e-4 * np.abs(one_shot).max())
    b.prefill_chunk = 3
    gen_chunked = b.generate(prompt, sampling=Sampling(8, ignore_eos=True)).ids
    b.prefill_chunk = 256
    assert gen_chunked == b.generate(prompt, sampling=Sampling(8, ignore_eos=True)).ids
