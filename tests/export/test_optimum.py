"""Bundles other tools understand (issue 10, items 18 and 19).

18: a static bundle is a Hugging Face model directory: transformers' AutoConfig reads its config.json, its
    tokenizer returns only input_ids and attention_mask, and optimum's ORTModelForCausalLM.from_pretrained(bundle)
    generates the same greedy tokens as emo-edge's runtime (what `emo-edge run` uses), with logits equal to
    `emo-edge logits BUNDLE`. The optimum tests skip only when the `optimum` extra is not installed; CI installs it.
19: a swappable bundle ships no genai_config.json (it would name a model.onnx that is not there); its decoder dims
    are the manifest's swappable.model, and `export --swappable` reports the bundle's real path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ROOT, run_cli

CTX = 96
PROMPTS = ["Solve for x: 3x + 5 = 20.", "def add(a, b):\n    return"]
EMBEDDED = ROOT / "emo_edge" / "models" / "emo-tiny"


def _static(out, precision, ckpt=EMBEDDED):
    from emo_edge.export.pipeline import export
    export(ckpt, "all", None, CTX, "cpu", precision, out, False, False, progress=False)
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    return {p: _static(d / p, p) for p in ("fp32", "int4")}


# ---- 18: config.json and the tokenizer ---------------------------------------------------------------------
def test_config_json_and_tokenizer_files_are_in_the_manifest(bundles):
    from emo_edge.bundle.files import sha256_file
    for b in bundles.values():
        m = json.loads((b / "manifest.json").read_text())
        assert m["files"]["config.json"]["sha256"] == sha256_file(b / "config.json")
        tc = json.loads((b / "tokenizer_config.json").read_text())
        assert tc["model_input_names"] == ["input_ids", "attention_mask"] and tc["model_max_length"] == CTX


@pytest.mark.parametrize("name", ["gqa_bias_headdim", "mha_tied", "rope_llama3", "rope_yarn", "rope_linear"])
def test_autoconfig_reads_what_the_graph_has(variant, tmp_path, name):
    """AutoConfig's view of config.json equals the checkpoint's spec, and the KV-cache inputs of a real graph have
    the shape the config implies (num_key_value_heads, head_dim)."""
    transformers = pytest.importorskip("transformers")
    import onnx

    from emo_edge.model.checkpoint import CheckpointView
    ckpt = variant(name)
    spec = CheckpointView(ckpt).spec
    b = _static(tmp_path / "b", "fp32", ckpt)
    cfg = transformers.AutoConfig.from_pretrained(str(b))
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == \
        ("llama", spec.vocab_size, spec.hidden_size, spec.num_layers)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == \
        (spec.num_heads, spec.num_kv_heads, spec.head_dim)
    assert (cfg.attention_bias, cfg.tie_word_embeddings, cfg.rms_norm_eps, cfg.rope_theta) == \
        (spec.attention_bias, spec.tie_word_embeddings, spec.rms_norm_eps, spec.rope_theta)
    assert (cfg.rope_scaling or {}).get("rope_type", "default") == spec.rope_type
    assert cfg.eos_token_id == spec.eos_token_id
    graph = onnx.load(str(b / "model.onnx"), load_external_data=False).graph
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    dims = [d.dim_value or d.dim_param for d in past.type.tensor_type.shape.dim]
    assert dims[1] == cfg.num_key_value_heads and dims[3] == cfg.head_dim
    n_past = sum(i.name.startswith("past_key_values.") for i in graph.input)
    assert n_past == 2 * cfg.num_hidden_layers


def test_transformers_tokenizer_matches_ours_without_token_type_ids(bundles):
    transformers = pytest.importorskip("transformers")
    from emo_edge.model.tokenizer import TextTokenizer
    b = bundles["fp32"]
    tok = transformers.AutoTokenizer.from_pretrained(str(b))
    ours = TextTokenizer(b / "tokenizer.json")
    for text in PROMPTS:
        enc = tok(text)
        assert set(enc) == {"input_ids", "attention_mask"}
        assert enc["input_ids"] == ours.encode(text)


def test_checkpoint_tokenizer_config_is_checked(tmp_path):
    from emo_edge.errors import BundleError
    from emo_edge.export.bundle_writer import bundle_tokenizer_config
    bad = tmp_path / "tokenizer_config.json"
    bad.write_text("[1, 2]")
    with pytest.raises(BundleError, match="tokenizer_config.json: expected a JSON object"):
        bundle_tokenizer_config(bad, CTX)
    bad.write_text('{"model_max_length": NaN}')
    with pytest.raises(BundleError, match="tokenizer_config.json"):
        bundle_tokenizer_config(bad, CTX)
    ok = tmp_path / "ok.json"
    ok.write_text('{"chat_template": "x", "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}')
    got = bundle_tokenizer_config(ok, CTX)
    assert got == {"chat_template": "x", "model_input_names": ["input_ids", "attention_mask"], "model_max_length": CTX}


# ---- 18: optimum generates what emo-edge generates ---------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_optimum_generates_same_greedy_tokens_as_emo_edge(bundles, tmp_path, precision):
    pytest.importorskip("optimum.onnxruntime")
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    from emo_edge.engine import StaticEngine
    b = bundles[precision]
    model = ORTModelForCausalLM.from_pretrained(str(b))  # no file_name, no config edits: the bundle as written
    tok = AutoTokenizer.from_pretrained(str(b))
    ours = StaticEngine(b)
    for n, text in enumerate(PROMPTS):
        enc = tok(text, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=16)[0].tolist()
        assert out[:len(ids)] == ids
        theirs = out[len(ids):]
        if theirs and theirs[-1] == ours.eos:  # transformers keeps the EOS it stopped at; emo-edge drops it
            theirs = theirs[:-1]
        want = ours.generate(ids, max_tokens=16).ids
        assert len(want) >= 8, want  # a real continuation, not an immediate EOS
        assert theirs == want
        # teacher-forced: optimum's logits over prompt + continuation equal `emo-edge logits BUNDLE`
        seq = ids + want
        npy = tmp_path / f"l{n}.npy"
        r = run_cli("logits", str(b), "--ids", ",".join(map(str, seq)), "--out", str(npy))
        assert r.returncode == 0, r.stderr
        cli = np.load(npy)
        with torch.no_grad():
            got = model(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long))
        got = got.logits[0].float().numpy()
        assert got.shape == cli.shape == (len(seq), ours.vocab_size)
        assert np.abs(got - cli).max() <= 1e-5 * (cli.max() - cli.min())
        assert cli[len(ids) - 1:-1].argmax(-1).tolist() == want


# ---- 19: swappable bundles ---------------------------------------------------------------------------------
def test_swappable_has_no_genai_config_and_reports_its_path(variant, tmp_path):
    ckpt = variant("shared1")
    pools = []
    for name, take in (("p_low", slice(0, 4)), ("p_high", slice(3, 7))):
        from emo_edge.model.checkpoint import CheckpointView
        spec = CheckpointView(ckpt).spec
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"layers": [None if l.num_experts == 0 else list(l.routed_experts)[take]
                                            for l in spec.layers]}))
        pools.append(str(p))
    out = tmp_path / "swap"
    r = run_cli("export", "--model", str(ckpt), "--pools", ",".join(pools), "--context", "64", "--precision",
                "fp32", "--no-verify", "--swappable", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"bundle: {out} (" in r.stdout and "union-static" not in r.stdout
    assert not (out / "genai_config.json").exists() and not (out / "config.json").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert "genai_config.json" not in m["files"]
    # the dims the runtime reads are exactly what the static export of the same union wrote
    static = tmp_path / "static"
    from emo_edge.export.pipeline import export
    export(ckpt, ",".join(pools), None, 64, "cpu", "fp32", static, False, False, progress=False)
    assert m["swappable"]["model"] == json.loads((static / "genai_config.json").read_text())["model"]
    report = json.loads((out / "report.json").read_text())
    assert report["path"] == str(out) and report["name"] == "swap"
    assert "union-static" not in (out / "report.md").read_text()
    from emo_edge.engine.swappable import SwappableEngine
    rt = SwappableEngine(out, budget=None)
    assert (rt.n_layers, rt.context, rt.vocab_size) == (spec.num_layers, 64, spec.vocab_size)


def test_onnxruntime_genai_loads_static_bundle_with_config_json(bundles):
    """config.json beside genai_config.json does not disturb onnxruntime-genai (same greedy tokens)."""
    og = pytest.importorskip("onnxruntime_genai")
    from emo_edge.engine import StaticEngine
    b = bundles["fp32"]
    ids = StaticEngine(b).tokenizer.encode(PROMPTS[0])
    m = og.Model(str(b))
    p = og.GeneratorParams(m)
    p.set_search_options(max_length=len(ids) + 8, do_sample=False)
    g = og.Generator(m, p)
    g.append_tokens(np.array(ids, dtype=np.int32))
    while not g.is_done():
        g.generate_next_token()
    seq = [int(t) for t in g.get_sequence(0)]
    ours = StaticEngine(b).generate(ids, max_tokens=len(seq) - len(ids), ignore_eos=True).ids
    assert seq == ids + ours
