"""The checkpoint reader: exact data, lazy access, and one-line errors for every kind of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from conftest import make_variant, run_cli
from emo_edge.model.checkpoint import CheckpointView
from emo_edge.cli import cli
from emo_edge.errors import CheckpointError, ConfigError
from emo_edge.model.reference import Reference
from emo_edge.model.spec import spec_from_config

IDS = [5, 17, 99, 3, 250, 42, 7, 11]


def test_reader_matches_safetensors_library(variant):
    root = variant("shared1", dtype="bf16", shard_size=40_000)
    view = CheckpointView(root)
    index = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1, "expected a sharded checkpoint"
    for name, file in index.items():
        with safe_open(str(root / file), "pt") as f:
            expected = f.get_tensor(name).float()
        assert torch.equal(view.tensor(name), expected), name
    rows = [3, 0, 3, 200]
    assert torch.equal(view.tensor("model.embed_tokens.weight", rows=rows),
                       view.tensor("model.embed_tokens.weight")[rows])


def test_bf16_sharded_twin_matches_fp32_within_bf16_rounding(ckpt_root):
    fp32 = CheckpointView(make_variant(ckpt_root, "shared2", dtype="fp32"))
    bf16 = CheckpointView(make_variant(ckpt_root, "shared2", dtype="bf16", shard_size=50_000))
    # the bf16 weights are exactly the fp32 weights rounded to bf16 (round to nearest even)
    for name in fp32.tensors:
        assert torch.equal(bf16.tensor(name), fp32.tensor(name).to(torch.bfloat16).float()), name
    a = Reference(fp32).forward([IDS])[0]
    b = Reference(bf16).forward([IDS])[0]
    # relative weight error of bf16 is at most 2^-9; the logits move by the same order of magnitude
    rel = float((a - b).abs().max() / (a.max() - a.min()))
    assert rel < 2e-2, rel
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


def _cli_error(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture()
def broken(ckpt_root, tmp_path):
    """A fresh, writable copy of a sharded bf16 checkpoint to break."""
    src = make_variant(ckpt_root, "shared1", dtype="bf16", shard_size=40_000)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_shard(broken):
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = _cli_error("inspect", str(broken))
    assert shard.name in msg and "missing" in msg


def test_truncated_safetensors(broken):
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    msg = _cli_error("inspect", str(broken))
    assert shard.name in msg and "truncated" in msg


def test_shape_mismatch(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (broken / "config.json").write_text(json.dumps(cfg))
    msg = _cli_error("inspect", str(broken))
    assert "mlp.experts.0.gate_proj.weight" in msg and "[32, 64]" in msg and "[48, 64]" in msg


def test_unknown_model_type(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "olmoe"
    (broken / "config.json").write_text(json.dumps(cfg))
    msg = _cli_error("inspect", str(broken))
    assert "config.json" in msg and "'olmoe'" in msg


def test_index_entry_outside_directory(broken):
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../" + index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    msg = _cli_error("inspect", str(broken))
    assert name in msg and "outside" in msg


def test_unsupported_rope_scaling(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "longrope", "factor": 4.0}
    (broken / "config.json").write_text(json.dumps(cfg))
    msg = _cli_error("inspect", str(broken))
    assert "longrope" in msg


def test_index_and_shard_disagree(broken):
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    index_path.write_text(json.dumps(index))
    msg = _cli_error("inspect", str(broken))
    assert name in msg


def test_pickle_only_checkpoint_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(json.loads(
        (make_variant(tmp_path, "shared1") / "config.json").read_text())))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    msg = _cli_error("inspect", str(tmp_path))
    assert "unpickle" in msg


def test_error_from_real_process_has_no_traceback(tmp_path):
    result = run_cli("inspect", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "nope" in result.stderr


@pytest.mark.parametrize("change,needle", [
    ({"norm_topk_prob": True}, "norm_topk_prob"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"always_active_experts": [0, 99]}, "always_active"),
    ({"num_experts_per_layer": [8, 0]}, "dense_intermediate_size"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_config_refusals(change, needle):
    cfg = {"model_type": "emo", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 8,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 3,
           "num_shared_experts": 1, **change}
    if change.get("num_experts_per_tok") == 9:
        cfg["num_shared_experts"] = 0
    with pytest.raises(ConfigError, match=needle):
        spec_from_config(cfg)


def test_max_position_minus_one_means_unknown():
    cfg = {"model_type": "emo", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
           "max_position_embeddings": -1}
    assert spec_from_config(cfg).max_position_embeddings is None


def test_released_shape_parameter_counts():
    from emo_edge.model.synth import PRESETS, build_config

    spec = spec_from_config(build_config(PRESETS["emo-14b"]))
    counts = spec.param_counts()
    # independent arithmetic for 16 layers, hidden 2048, 128 experts of 1024, top-8, vocab 100352, untied
    experts = 16 * 128 * 3 * 2048 * 1024
    attention = 16 * 4 * 2048 * 2048
    embed = 100352 * 2048
    routers, norms = 16 * 128 * 2048, 16 * 2 * 2048 + 2048
    assert counts["total"] == experts + attention + 2 * embed + routers + norms
    assert counts["active"] == 16 * 8 * 3 * 2048 * 1024 + attention + embed + 2048 + routers + norms
    assert 13.4e9 < counts["total"] < 14.0e9 and 1.2e9 < counts["active"] < 1.4e9


def test_reader_is_lazy(variant):
    view = CheckpointView(variant("shared1", dtype="bf16"))
    assert view._maps == {}  # opening parsed headers only
    view.tensor("model.norm.weight")
    assert len(view._maps) == 1
    with pytest.raises(CheckpointError, match="no tensor"):
        view.tensor("model.layers.9.mlp.gate.weight")
    assert isinstance(view.raw("model.norm.weight"), np.ndarray)


def test_inspect_released_width_is_lazy(tmp_path):
    """inspect on the real 14B width (2 layers) never reads weights: peak RSS of the process stays under 1 GB.
    The checkpoint's data is a sparse hole, so reading it would still cost resident pages."""
    from emo_edge.model.names import expected_tensors
    from emo_edge.model.synth import PRESETS, build_config
    from emo_edge.model.writer import write_checkpoint

    config = build_config(PRESETS["emo-14b"], layers=2)
    shapes = {k.hf_name: s for k, s in expected_tensors(spec_from_config(config)).items()}
    root = write_checkpoint(tmp_path / "emo14b", config, shapes, None, dtype="bf16", shard_size=2_000_000_000)
    assert sum(f.stat().st_size for f in root.glob("*.safetensors")) > 3e9
    import subprocess
    import sys
    probe = ("import resource, subprocess, sys; r = subprocess.run([sys.executable, 'cli.py', 'inspect', sys.argv[1]], "
             "capture_output=True, text=True); print(r.returncode); print(r.stdout); "
             "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, str(root)], capture_output=True, text=True,
                         cwd=str(make_variant.__globals__["ROOT"])).stdout
    assert out.splitlines()[0] == "0", out
    assert "total 13" not in out  # 2 layers, not 16
    assert "experts      128 per layer" in out and "top-8" in out
    maxrss_kb = int(out.split("MAXRSS")[1])
    assert maxrss_kb < 1024 * 1024, f"inspect peak RSS {maxrss_kb / 1024:.0f} MB"
