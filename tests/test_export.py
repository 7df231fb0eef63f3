"""export -> bundle -> logits/generation parity against the reference, for every routing variant (tiny shapes)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, VARIANTS, run_cli

CTX = 64
FP32_VARIANTS = [v for v in VARIANTS if v != "rope_dynamic"]


def _pool(ckpt, tmp_path):
    """Keep a strict subset of each MoE layer's routed experts (routed_k + 2 of them): a real pool restriction."""
    from emo_edge.checkpoint import CheckpointView
    spec = CheckpointView(ckpt).spec
    layers = [None if l.num_experts == 0 else list(l.routed_experts)[::-1][: l.routed_k + 2][::-1]
              for l in spec.layers]
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"layers": layers}))
    return path


def _export(ckpt, pool, out, precision="fp32", verify=True):
    from emo_edge.export.pipeline import export
    return export(ckpt, str(pool), None, CTX, "cpu", precision, out, False, verify, progress=False)


@pytest.mark.parametrize("name", FP32_VARIANTS)
def test_fp32_bundle_matches_reference(variant, tmp_path, name):
    from emo_edge.engine import StaticEngine
    from emo_edge.bundle_logits import bundle_logits
    from emo_edge.checkpoint import CheckpointView
    from emo_edge.commands.logits import checkpoint_logits
    from emo_edge.poolfile import read_pool_file
    from emo_edge.reference import Reference

    ckpt = variant(name)
    pool = _pool(ckpt, tmp_path)
    out = tmp_path / "bundle"
    report = _export(ckpt, pool, out)
    assert report["verification"]["passed"], report["verification"]
    ids = [5, 17, 99, 3, 250, 7, 42, 8, 300, 1, 2, 77]
    ref = checkpoint_logits(ckpt, ids, str(pool), None)
    got = bundle_logits(out, ids, str(pool), None)
    assert got.shape == ref.shape
    assert np.abs(ref - got).max() <= 1e-3 * (ref.max() - ref.min())
    view = CheckpointView(ckpt)
    want = Reference(view, pool=read_pool_file(pool, view.spec)).generate(ids[:5], 32)
    have = StaticEngine(out).generate(ids[:5], max_tokens=32, ignore_eos=True).ids
    assert have == want
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["files"]) >= {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
                               "genai_config.json", "report.json", "report.md"}
    assert m["source"]["identity"] == view.identity


def test_rope_dynamic_refused_past_original_length(variant, tmp_path):
    from emo_edge.errors import EmoEdgeError
    ckpt = variant("rope_dynamic")
    with pytest.raises(EmoEdgeError, match="dynamic"):
        _export(ckpt, "all", tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("precision,name", [("int4", "shared1"), ("int8", "always_active"), ("int4", "topk_norm")])
def test_quantized_bundle_runs_and_reports_parity(variant, tmp_path, precision, name):
    from emo_edge.engine import StaticEngine
    ckpt = variant(name)
    out = tmp_path / "q"
    report = _export(ckpt, "all", out, precision, verify=False)
    from emo_edge.export.pipeline import _verify, planning
    assert report["plan"]["precision"]["experts"] == precision
    b = StaticEngine(out)
    done = b.generate([5, 17, 99], max_tokens=8, ignore_eos=True)
    toks, speed = done.ids, done.timings()
    assert len(toks) == 8 and speed["decode_tok_s"] > 0
    onnx_text = (out / "model.onnx").read_bytes()
    assert b"QMoE" in onnx_text and b"MatMulNBits" in onnx_text
    # parity stats against the fp32 reference
    from emo_edge.checkpoint import CheckpointView
    view = CheckpointView(ckpt)
    layers, _, _ = planning.resolve_pool_layers(view, "all", view.spec)
    from emo_edge.plan import make_plan
    from targets import get_target
    plan = make_plan(view.spec, layers, None, CTX, "cpu", precision)
    res = _verify(view, layers, plan, out, get_target("cpu"), False, 2)
    for k in ("top1_agreement", "kl_mean", "ppl_ratio"):
        assert np.isfinite(res[k])
    assert res["top1_agreement"] > 0.5 and res["kl_mean"] < 0.3


# ---- command line and robustness -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory, variant):
    ckpt = variant("shared1")
    out = tmp_path_factory.mktemp("cli") / "b"
    r = run_cli("export", "--model", str(ckpt), "--pools", "all", "--context", str(CTX), "--precision", "fp32",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "verification: PASS" in r.stdout
    return ckpt, out


def test_cli_run_and_logits(cli_bundle, tmp_path):
    ckpt, out = cli_bundle
    r = run_cli("run", str(out), "--prompt", "the river", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "prefill:" in r.stderr and "decode:" in r.stderr and "tok/s" in r.stderr
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert run_cli("logits", str(ckpt), "--ids", "5,17,99", "--out", str(a)).returncode == 0
    assert run_cli("logits", str(out), "--ids", "5,17,99", "--out", str(b)).returncode == 0
    ra, rb = np.load(a), np.load(b)
    assert ra.shape == rb.shape and np.abs(ra - rb).max() <= 1e-3 * (ra.max() - ra.min())
    r = run_cli("run", str(out), "--prompt", "the", "--max-new-tokens", "4", "--temperature", "0.8", "--top-p",
                "0.9", "--seed", "1")
    assert r.returncode == 0, r.stderr


def test_device_side_does_not_import_torch(cli_bundle):
    _, out = cli_bundle
    code = ("import sys; from emo_edge.bundle_logits import bundle_logits; import emo_edge.commands.run;"
            f"bundle_logits({str(out)!r}, [1, 2, 3], None, None); assert 'torch' not in sys.modules, 'torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr


def test_refuses_existing_unknown_and_corrupt(cli_bundle, tmp_path):
    ckpt, out = cli_bundle
    r = run_cli("export", "--model", str(ckpt), "--pools", "all", "--context", str(CTX), "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli("export", "--model", str(ckpt), "--pools", "nosuchpool", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown pool 'nosuchpool'" in r.stderr
    r = run_cli("export", "--model", str(ckpt), "--pools", "all", "--target", "nosuch", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "unknown target 'nosuch'" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # a corrupted file: run and logits refuse
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(out, bad)
    with open(bad / "tokenizer_config.json", "a") as f:
        f.write(" ")
    r = run_cli("run", str(bad), "--prompt", "the")
    assert r.returncode == 2 and "tokenizer_config.json" in r.stderr
    r = run_cli("logits", str(bad), "--ids", "1,2", "--out", str(tmp_path / "l.npy"))
    assert r.returncode == 2 and ("sha256" in r.stderr or "bytes" in r.stderr)


def test_budget_unparsable_or_too_small_writes_nothing(variant, tmp_path):
    ckpt = variant("shared1")
    r = run_cli("export", "--model", str(ckpt), "--pools", "all", "--budget", "4XB", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "'4XB'" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = run_cli("export", "--model", str(ckpt), "--pools", "all", "--budget", "1KB", "--context", str(CTX),
                "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "cannot hold the minimum model" in r.stderr and "Traceback" not in r.stderr
    # the message states the minimum; a budget of exactly that minimum is accepted
    minimum = int(r.stderr.split("minimum model: ")[1].split("(")[1].split(" bytes")[0])
    r = run_cli("export", "--model", str(ckpt), "--pools", "all", "--budget", str(minimum), "--context", str(CTX),
                "--no-verify", "--out", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_force_replaces(cli_bundle, tmp_path, variant):
    ckpt = variant("topk")
    out = tmp_path / "f"
    _export(ckpt, "all", out, verify=False)
    from emo_edge.export.pipeline import export
    export(ckpt, "all", None, CTX, "cpu", "fp32", out, True, False, progress=False)
    assert (out / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_disk_full_leaves_nothing(variant, tmp_path, monkeypatch):
    from exporters import onnx as onnx_exporter
    from emo_edge.errors import BundleError
    calls = {"n": 0}
    real = onnx_exporter.ExternalData._put

    def put(self, data):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(onnx_exporter.ExternalData, "_put", put)
    out = tmp_path / "full"
    with pytest.raises(BundleError, match="no space left on device"):
        _export(variant("shared1"), "all", out)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing(variant, tmp_path, monkeypatch):
    from emo_edge.export import weights
    real = weights.layer_weights

    def boom(view, i, kept):
        if i == 1:
            raise KeyboardInterrupt
        return real(view, i, kept)

    monkeypatch.setattr(weights, "layer_weights", boom)
    with pytest.raises(KeyboardInterrupt):
        _export(variant("shared1"), "all", tmp_path / "int")
    assert list(tmp_path.iterdir()) == []
