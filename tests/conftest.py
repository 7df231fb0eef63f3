"""Shared fixtures: small synthetic checkpoints of every routing variant, written once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# test modules share helpers across the package folders (`from test_serve import Server`); their names are unique,
# so every folder goes on the path, whichever test runs alone
sys.path[2:2] = [str(d) for d in sorted(Path(__file__).resolve().parent.iterdir())
                 if d.is_dir() and not (d / "__init__.py").exists() and any(d.glob("test_*.py"))]

from emo_edge.model.synth import PRESETS, synthesize, with_layers  # noqa: E402

TINY = PRESETS["tiny"]

# name -> (shape changes, config overrides, layers)
VARIANTS = {
    "topk": (dict(num_shared=0), {}, None),
    "topk_norm": (dict(num_shared=0), dict(norm_topk_prob=True), None),
    "shared1": ({}, {}, None),
    "shared2": (dict(num_shared=2, top_k=4), {}, None),
    "always_active": (dict(num_shared=0, top_k=4), dict(always_active_experts=[0, 5]), None),
    "always_per_layer": (dict(num_shared=1, top_k=3), dict(always_active_experts_per_layer=[[2], [1, 7]]), None),
    "per_layer_dense": (dict(num_shared=1), dict(num_experts_per_layer=[8, 6, 0, 8],
                                                 num_shared_experts_per_layer=[1, 1, 0, 2],
                                                 dense_intermediate_size=48, dense_mlp_bias=True), 4),
    "gqa_bias_headdim": (dict(num_kv_heads=1, head_dim=8), dict(attention_bias=True), None),
    "mha_tied": (dict(num_kv_heads=4), dict(tie_word_embeddings=True), None),
    "rope_linear": ({}, dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), None),
    "rope_dynamic": ({}, dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=4), None),
    "rope_yarn": ({}, dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
                           max_position_embeddings=4096), None),
    "rope_llama3": ({}, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), None),
}


def make_variant(root: Path, name: str, dtype: str = "fp32", shard_size: int | None = None, seed: int = 0) -> Path:
    changes, overrides, layers = VARIANTS[name]
    out = root / f"{name}-{dtype}-{shard_size or 0}-{seed}"
    if not out.exists():
        synthesize(out, with_layers(TINY, **changes), config_overrides=overrides, layers=layers, dtype=dtype,
                   shard_size=shard_size, seed=seed)
    return out


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def variant(ckpt_root):
    return lambda name, **kw: make_variant(ckpt_root, name, **kw)


def run_cli(*args: str, env: dict | None = None):
    """Run `python cli.py ...` in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=str(ROOT))


@pytest.fixture(scope="session")
def concat_bundle(tmp_path_factory) -> Path:
    """An fp32 bundle of a head-size-8 synthetic model: the exporter's Concat attention (GroupQueryAttention
    needs head_size % 16 == 0), whose KV cache is replaced (not shared) each step."""
    d = tmp_path_factory.mktemp("concat")
    r = run_cli("-q", "synth", str(d / "ck8"), "--preset", "tiny", "--head-dim", "8", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    r = run_cli("-q", "export", "--model", str(d / "ck8"), "--pools", "all", "--precision", "fp32", "--no-verify",
                "--out", str(d / "concat"))
    assert r.returncode == 0, r.stderr
    return d / "concat"


@pytest.fixture(autouse=True, scope="session")
def _isolated_catalog(tmp_path_factory):
    """Pools discovered by tests go to a temporary catalog, never the user's ~/.cache/emo-edge."""
    home = tmp_path_factory.mktemp("emo-edge-home")
    old = os.environ.get("EMO_EDGE_HOME")
    os.environ["EMO_EDGE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("EMO_EDGE_HOME", None)
    else:
        os.environ["EMO_EDGE_HOME"] = old


def genai_greedy(og, bundle: Path, ids: list[int], max_length: int) -> list[int]:
    """The whole greedy sequence onnxruntime-genai (module `og`) generates from `ids` on a bundle, unchanged."""
    import numpy as np

    m = og.Model(str(bundle))
    p = og.GeneratorParams(m)
    p.set_search_options(max_length=max_length, do_sample=False)
    g = og.Generator(m, p)
    g.append_tokens(np.array(ids, dtype=np.int32))
    while not g.is_done():
        g.generate_next_token()
    return [int(t) for t in g.get_sequence(0)]
