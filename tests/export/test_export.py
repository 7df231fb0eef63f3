"""export -> bundle -> logits/generation parity against the reference, for every routing variant (tiny shapes)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, VARIANTS, genai_greedy, run_cli

CTX = 64
FP32_VARIANTS = [v for v in VARIANTS if v != "rope_dynamic"]


def _pool(ckpt, tmp_path):
    """Keep a strict subset of each MoE layer's routed experts (routed_k + 2 of them): a real pool restriction."""
    from emo_edge.model.checkpoint import CheckpointView
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
    from emo_edge.commands.logits import bundle_logits
    from emo_edge.model.checkpoint import CheckpointView
    from emo_edge.commands.logits import checkpoint_logits
    from emo_edge.pools.file import read_pool_file
    from emo_edge.model.reference import Reference

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
    from emo_edge.model.checkpoint import CheckpointView
    view = CheckpointView(ckpt)
    layers, _, _ = planning.resolve_pool_layers(view, "all", view.spec)
    from emo_edge.plan.search import make_plan
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
    code = ("import sys; from emo_edge.commands.logits import bundle_logits; import emo_edge.commands.run;"
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
    calls = {"n": 0, "fail_at": None}
    real = onnx_exporter.ExternalData._put

    def put(self, data):
        calls["n"] += 1
        if calls["fail_at"] is not None and calls["n"] > calls["fail_at"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(onnx_exporter.ExternalData, "_put", put)
    _export(variant("shared1"), "all", tmp_path / "count")  # how many writes a whole export makes
    shutil.rmtree(tmp_path / "count")
    calls.update(fail_at=calls["n"] // 2, n=0)  # the disk fills half-way through the weights
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


# ---- KV cache dtype, layouts and the planner's bytes against real bundles ----------------------------------
def _ort_logits(model_onnx, ids):
    """Logits of one sequence straight from onnxruntime, the empty KV cache typed from the graph's inputs."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(model_onnx), providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    kv = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), types[i.type])
            kv[i.name] = i.type
    outs = {o.name: o.type for o in sess.get_outputs()}
    return sess.run(["logits"], feed)[0][0], kv, outs


@pytest.mark.parametrize("name", ["shared1", "gqa_bias_headdim"])  # GroupQueryAttention / plain attention ops
def test_fp16_kv_cache_graph(variant, tmp_path, name):
    """Quantized plans get a float16 KV cache ('tensor(float16)' past/present), all-fp32 plans keep float32; the
    fp16 cache changes the logits by fp16 rounding only (same bundle rebuilt with a float32 cache)."""
    import dataclasses

    from emo_edge.export.pipeline import export
    from targets import get_target

    ckpt = variant(name)
    ids = [5, 17, 99, 3, 250, 7, 42, 8]
    half, f32 = tmp_path / "half", tmp_path / "f32"
    r = export(ckpt, "all", None, CTX, "cpu", "int4", half, False, False, progress=False)
    assert r["plan"]["kv_cache_dtype"] == "float16"
    export(ckpt, "all", None, CTX, dataclasses.replace(get_target("cpu"), kv_cache_dtype="float32"), "int4", f32,
           False, False, progress=False)
    a, kv, outs = _ort_logits(half / "model.onnx", ids)
    b, kv32, _ = _ort_logits(f32 / "model.onnx", ids)
    assert set(kv.values()) == {"tensor(float16)"} and set(kv32.values()) == {"tensor(float)"}
    assert {t for n, t in outs.items() if n.startswith("present.")} == {"tensor(float16)"}
    assert outs["logits"] == "tensor(float)"
    assert np.abs(a - b).max() <= 2e-2 * (b.max() - b.min())
    exact = export(ckpt, "all", None, CTX, "cpu", "fp32", tmp_path / "exact", False, False, progress=False)
    assert exact["plan"]["kv_cache_dtype"] == "float32"
    assert set(_ort_logits(tmp_path / "exact" / "model.onnx", ids)[1].values()) == {"tensor(float)"}


@pytest.mark.parametrize("name,precision", [("shared1", "int4"), ("mha_tied", "int4"), ("per_layer_dense", "int8"),
                                            ("shared2", "fp16")])
def test_planned_file_bytes_are_the_bundles(variant, tmp_path, name, precision):
    """The plan's file bytes are exactly the weights the exporter wrote (tied heads included: their own copy;
    implicit router rows only where the graph has them)."""
    import onnx

    from emo_edge.export.pipeline import export

    out = tmp_path / "b"
    r = export(variant(name), "all", None, CTX, "cpu", precision, out, False, False, progress=False)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    written = 0
    for t in m.graph.initializer:  # weights and caches: every float/uint8 initializer that is not a scalar
        n = int(np.prod(t.dims)) if t.dims else 1
        if t.data_type == onnx.TensorProto.INT64 or n <= 1:
            continue  # shapes, axes, split sizes; scalar constants (mask value, scale, ...)
        length = [int(e.value) for e in t.external_data if e.key == "length"]
        written += length[0] if length else len(t.raw_data)
    assert r["plan"]["plan"]["bytes"]["weights"] == written, (r["plan"]["plan"]["bytes"], written)


def test_onnxruntime_genai_runs_fp16_kv_bundle(tmp_path):
    """onnxruntime-genai takes the KV cache type from the graph's inputs: an int4 bundle of the embedded model with
    its float16 cache runs unchanged and generates the engine's greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    from emo_edge.engine import StaticEngine
    from emo_edge.export.pipeline import export

    out = tmp_path / "b"
    export(ROOT / "emo_edge" / "models" / "emo-tiny", "math,code", None, 256, "cpu", "int4", out, False, False,
           progress=False)
    assert set(_ort_logits(out / "model.onnx", [5])[1].values()) == {"tensor(float16)"}
    ids = [5, 17, 99, 3, 250, 42]
    seq = genai_greedy(og, out, ids, 30)
    assert seq == ids + StaticEngine(out).generate(ids, max_tokens=len(seq) - len(ids), ignore_eos=True).ids


def test_int8_kv_cache_calibrated_scales(variant, tmp_path):
    """An int8 KV cache (the planner's choice when float16 does not fit): GroupQueryAttention's native int8 cache
    with per-channel k_scale / v_scale calibrated on the built-in calibration text. The scales equal an
    independent computation (the reference's own KV cache of each calibration document), and the logits stay
    close to the same bundle with a float16 cache."""
    import dataclasses

    import onnx
    import torch

    from emo_edge.model.checkpoint import CheckpointView
    from emo_edge.export import kv_scales
    from emo_edge.export.pipeline import export
    from emo_edge.pools.calib import load_calibration
    from emo_edge.model.reference import Reference
    from emo_edge.model.tokenizer import TextTokenizer
    from targets import get_target

    ckpt = variant("shared1")
    cpu = get_target("cpu")
    q8, q16 = tmp_path / "q8", tmp_path / "q16"
    r = export(ckpt, "all", None, CTX, dataclasses.replace(cpu, kv_cache_dtype="int8", kv_cache_dtypes=("int8",)),
               "int4", q8, False, False, progress=False)
    export(ckpt, "all", None, CTX, cpu, "int4", q16, False, False, progress=False)
    assert r["plan"]["kv_cache_dtype"] == "int8" and r["kv_calibration"]["margin"] == kv_scales.MARGIN
    ids = [5, 17, 99, 3, 250, 7, 42, 8]
    import onnxruntime as ort
    sess = ort.InferenceSession(str(q8 / "model.onnx"), providers=["CPUExecutionProvider"])
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    assert {i.type for i in past} == {"tensor(int8)"}
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    feed.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.int8) for i in past})
    got = sess.run(["logits"], feed)[0][0]
    want = _ort_logits(q16 / "model.onnx", ids)[0]
    assert np.abs(got - want).max() <= 5e-2 * (want.max() - want.min())
    # the engine runs it (its int8 cache shared between past and present): prefill in chunks, then a step, against
    # onnxruntime's copy-based run of the whole sequence above
    from emo_edge.engine import StaticEngine

    s = StaticEngine(q8).session(len(ids))
    s.prefill_chunk = 3
    assert s.kv.dtype == np.int8 and s.kv.shared
    last = s.prefill(ids[:-1])
    step = s.feed(ids[-1:])
    for mine, theirs in ((last[-1], got[-2]), (step[-1], got[-1])):
        assert np.abs(mine - theirs).max() <= 1e-3 * (theirs.max() - theirs.min())
    # the scales: absmax over every calibration token of the reference's cached k (after RoPE) and v
    view = CheckpointView(ckpt)
    ref = Reference(view, pool=None)
    cal = load_calibration(sorted(kv_scales.CALIB_DIR.glob("*.jsonl")), TextTokenizer(ckpt / "tokenizer.json"),
                           max_tokens=kv_scales.CALIB_TOKENS, max_docs=kv_scales.CALIB_DOCS)
    L, n = view.spec.num_layers, view.spec.num_kv_heads * view.spec.head_dim
    amax = np.zeros((L, 2, n))
    for doc in cal.docs:
        cache: list = []
        with torch.no_grad():
            ref.forward(torch.tensor([doc]), cache)
        for i, (k, v) in enumerate(cache):
            for j, t in enumerate((k, v)):
                amax[i, j] = np.maximum(amax[i, j], t[0].abs().amax(dim=1).double().numpy().reshape(-1))
    m = onnx.load(str(q8 / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    for i in range(L):
        for j, name in enumerate(("k_scale", "v_scale")):
            np.testing.assert_allclose(inits[f"/model/layers.{i}/attn/{name}"], amax[i, j] * kv_scales.MARGIN / 127,
                                       rtol=1e-5)


def test_speed_export_folds_shared_expert(variant, tmp_path):
    """--optimize speed puts EMO's shared expert into each layer's QMoE (k = routed_k + 1, no dense MLP beside
    it): the bundle passes verification against the fp32 reference, and its logits equal those of the same plan
    exported with the shared expert apart (the same quantized weights, a different kernel) to float rounding."""
    import onnx

    from emo_edge.model.checkpoint import CheckpointView
    from emo_edge.export.pipeline import FOLD_NOTE, export

    ckpt = variant("shared1")
    spec = CheckpointView(ckpt).spec
    folded, apart = tmp_path / "folded", tmp_path / "apart"
    r = export(ckpt, "all", None, CTX, "cpu", "int4", folded, False, True, progress=False, optimize="speed")
    export(ckpt, "all", None, CTX, "cpu", "int4", apart, False, False, progress=False, optimize="speed",
           fold_shared=False)
    assert r["verification"]["passed"], r["verification"]
    assert r["plan"]["precision"]["experts"] in ("int4", "int8") and FOLD_NOTE in r["plan"]["notes"]
    moe_layers = [l for l in spec.layers if l.num_experts]
    for path, extra, mlp in ((folded, 1, 0), (apart, 0, len(moe_layers))):
        g = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
        ks = [next(a.i for a in n.attribute if a.name == "k") for n in g.node if n.op_type == "QMoE"]
        assert ks == [l.routed_k + extra for l in moe_layers]
        assert sum(1 for n in g.node if "/implicit.0/" in n.name and n.op_type == "MatMulNBits") == 2 * mlp
    ids = [5, 17, 99, 3, 250, 42, 7, 8]
    a, b = _ort_logits(folded / "model.onnx", ids)[0], _ort_logits(apart / "model.onnx", ids)[0]
    assert np.abs(a - b).max() <= 1e-4 * (b.max() - b.min()), float(np.abs(a - b).max())
    assert (a.argmax(-1) == b.argmax(-1)).all()
