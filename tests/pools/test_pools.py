"""Domain pools: discovery recovers planted groups, catalog determinism, composition, eval, and bad input."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from emo_edge.model.checkpoint import CheckpointView
from emo_edge.pools import Catalog, compose, discover_pool, pool_sizes, resolve_pools
from emo_edge.pools.discover import doc_nll
from emo_edge.model.reference import Reference, perplexity
from emo_edge.model.synth import PRESETS, digits_doc, letters_doc, synthesize, with_layers
from emo_edge.model.tokenizer import load_tokenizer

def invoke(*args: str):
    """The CLI in-process (fast); returns an object with returncode, stdout, stderr like run_cli."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    from emo_edge.cli import cli

    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return SimpleNamespace(returncode=res.exit_code, stdout=res.stdout, stderr=res.stderr)


# 16 routed experts (8 + 8 planted) + 1 shared; top-5 = 4 routed per token
PLANTED = with_layers(PRESETS["tiny"], num_experts=17, top_k=5)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    ckpt = synthesize(root / "ckpt", PLANTED, dtype="fp32", plant=True)
    groups = json.loads((ckpt / "synth.json").read_text())["plant"]["groups"]
    rng = random.Random(1)
    files = {}
    for dom, make in (("digits", digits_doc), ("letters", letters_doc)):
        files[dom] = root / f"{dom}.txt"
        files[dom].write_text("\n\n".join(make(rng) for _ in range(5)))
        files[dom + "-heldout"] = root / f"{dom}-heldout.jsonl"
        files[dom + "-heldout"].write_text("".join(json.dumps({"text": make(rng)}) + "\n" for _ in range(4)))
    return ckpt, groups, files


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*"))} if d.is_dir() else {}


@pytest.mark.parametrize("method", ["mass", "layerwise", "easy-ep"])
def test_discovery_recovers_planted_groups(planted, method):
    ckpt, groups, files = planted
    view = CheckpointView(ckpt)
    for dom in ("digits", "letters"):
        pool = discover_pool(view, dom, [files[dom]], method=method, experts=8)
        for i in range(view.spec.num_layers):
            want = groups[str(i)][dom]
            assert pool.layers[i] == want, (dom, i, pool.layers[i])
        assert all(s["coverage"] > 0.8 for s in pool.stats)


def test_right_pool_keeps_logits_wrong_pool_changes_them(planted):
    ckpt, groups, files = planted
    view = CheckpointView(ckpt)
    ids = load_tokenizer(ckpt).encode(files["digits"].read_text().split("\n\n")[0])
    full = Reference(view).forward([ids])[0]
    dev = {}
    for dom in ("digits", "letters"):
        pool = [groups[str(i)][dom] for i in range(view.spec.num_layers)]
        per_token = (Reference(view, pool=pool).forward([ids])[0] - full).abs().mean(-1)
        dev[dom] = float(per_token.median())  # the typical (in-domain) token; unplanted ones route anywhere
    assert dev["digits"] * 4 < dev["letters"], dev


def test_layer_sweep_matches_reference(planted):
    ckpt, groups, files = planted
    view = CheckpointView(ckpt)
    tok = load_tokenizer(ckpt)
    docs = [tok.encode(d)[:40] for d in files["letters"].read_text().split("\n\n")[:3]]
    pool = discover_pool(view, "l", [files["letters"]], method="layerwise", experts=8).layers
    got = doc_nll(Reference(view, streaming=True), docs, [None, pool])
    for p, (nll, n, _) in zip([None, pool], got):
        ref = Reference(view, pool=p)
        want = [perplexity(ref, d) for d in docs]
        assert n == sum(w[1] for w in want)
        assert abs(nll - sum(w[0] for w in want)) < 1e-3 * max(1.0, abs(nll))


def test_cli_discover_list_show_compose_deterministic(planted, tmp_path):
    ckpt, groups, files = planted
    cat_a, cat_b = tmp_path / "a", tmp_path / "b"
    for cat in (cat_a, cat_b):
        r = invoke("pools", "discover", str(ckpt), "--name", "digits", "--calib", str(files["digits"]),
                    "--experts", "8", "--catalog", str(cat))
        assert r.returncode == 0, r.stderr
    a, b = (cat_a / "digits.json").read_bytes(), (cat_b / "digits.json").read_bytes()
    assert a == b
    entry = json.loads(a)
    assert entry["format"] == "emo-edge-pool" and entry["version"] == 1
    assert entry["checkpoint"]["identity"] == CheckpointView(ckpt).identity
    assert entry["calibration"]["files"][0]["name"] == "digits.txt" and entry["calibration"]["documents"] == 5
    r = invoke("pools", "discover", str(ckpt), "--name", "letters", "--calib", str(files["letters"]),
                "--experts", "8", "--method", "mass", "--catalog", str(cat_a))
    assert r.returncode == 0, r.stderr
    r = invoke("pools", "list", str(ckpt), "--catalog", str(cat_a))
    assert r.returncode == 0 and "digits" in r.stdout and "letters" in r.stdout and "built-in" in r.stdout
    r = invoke("pools", "show", "digits", str(ckpt), "--catalog", str(cat_a), "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout) == {"layers": [groups[str(i)]["digits"] for i in range(2)]}
    r = invoke("pools", "compose", "digits,letters", str(ckpt), "--catalog", str(cat_a))
    assert r.returncode == 0, r.stderr
    assert "mean Jaccard 0.000" in r.stdout and "union: 32/32" in r.stdout


def test_eval_right_vs_wrong_and_sweep(planted, tmp_path):
    ckpt, groups, files = planted
    cat = tmp_path / "cat"
    cat.mkdir()
    view = CheckpointView(ckpt)
    for dom in ("digits", "letters"):
        pool = discover_pool(view, dom, [files[dom]], method="layerwise", experts=8)
        Catalog(view, cat).put(pool)
    ratios = {}
    for dom in ("digits", "letters"):
        r = invoke("eval", str(ckpt), "--pool", dom, "--text", str(files["digits-heldout"]), "--catalog", str(cat))
        assert r.returncode == 0, r.stderr
        line = [x for x in r.stdout.splitlines() if x.startswith("ratio")][0]
        ratios[dom] = (float(line.split()[2]), float(line.split("pool ")[1].split()[0]))
    assert abs(ratios["digits"][0] - 1) < 0.02, ratios  # the right pool keeps in-domain perplexity
    assert ratios["letters"][0] > 1.5, ratios  # the wrong pool is clearly worse
    assert ratios["letters"][1] > 100 * ratios["digits"][1], ratios  # and moves the distribution far more
    png = tmp_path / "ret.png"
    r = invoke("eval", str(ckpt), "--pool", "digits", "--calib", str(files["digits"]), "--text",
                str(files["digits-heldout"]), "--sweep", "0.5,0.25", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "0.25" in r.stdout and png.read_bytes()[:4] == b"\x89PNG"


def test_builtin_domain_discovered_once_and_cached(planted, tmp_path, monkeypatch):
    import emo_edge.pools.catalog as catalog

    ckpt, _, _ = planted
    monkeypatch.setenv("EMO_EDGE_HOME", str(tmp_path / "home"))
    small = tmp_path / "calib"  # the first documents of the built-in sets, to keep the test fast
    small.mkdir()
    for dom in ("math", "code"):
        lines = (catalog.BUILTIN_CALIB / f"{dom}.jsonl").read_text().splitlines()[:4]
        (small / f"{dom}.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(catalog, "BUILTIN_CALIB", small)
    view = CheckpointView(ckpt)
    (math,) = resolve_pools(view, ["math"])
    path = tmp_path / "home" / "pools" / view.identity[:16] / "math.json"
    assert path.is_file() and math.method == "layerwise" and math.fraction == 0.25
    assert [len(x) for x in math.layers] == [4, 4]  # 25% of 16 routed
    before = path.read_bytes()
    again = resolve_pools(view, ["math", str(path)])
    assert again[0].layers == math.layers == again[1].layers and path.read_bytes() == before
    union = compose(resolve_pools(view, ["math,code"]))
    assert all(len(u) >= 4 for u in union)


def test_implicit_experts_and_dense_layers(variant):
    view = CheckpointView(variant("per_layer_dense"))
    sizes = pool_sizes(view.spec, fraction=0.5)
    assert sizes[2] is None
    for method in ("mass", "layerwise", "easy-ep"):
        rng = random.Random(0)
        docs = [[rng.randrange(2, 300) for _ in range(12)] for _ in range(3)]
        from emo_edge.pools.discover import discover
        layers, stats = discover(Reference(view, streaming=True), docs, method, sizes)
        for layer, kept in zip(view.spec.layers, layers):
            if layer.num_experts == 0:
                assert kept is None
            else:
                assert not set(kept) & set(layer.implicit_experts) and len(kept) == sizes[layer.index]
    view = CheckpointView(variant("always_active"))
    assert pool_sizes(view.spec, experts=2) == [2, 2]  # 8 experts, 2 always-active: 6 routed, k=2


def test_bad_input_one_line_exit_2_catalog_untouched(planted, tmp_path):
    ckpt, groups, files = planted
    cat = tmp_path / "cat"
    r = invoke("pools", "discover", str(ckpt), "--name", "digits", "--calib", str(files["digits"]),
                "--experts", "8", "--catalog", str(cat))
    assert r.returncode == 0, r.stderr
    before = _snapshot(cat)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    foreign_ckpt = tmp_path / "other"
    shutil.copytree(ckpt, foreign_ckpt)
    cfg = json.loads((foreign_ckpt / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (foreign_ckpt / "config.json").write_text(json.dumps(cfg))
    cases = [
        ("eval", str(ckpt), "--pool", "nosuchpool", "--text", str(files["digits"]), "--catalog", str(cat)),
        ("pools", "show", "nosuchpool", str(ckpt), "--catalog", str(cat)),
        ("pools", "discover", str(ckpt), "--name", "x", "--calib", str(empty), "--catalog", str(cat)),
        ("pools", "discover", str(ckpt), "--name", "x", "--calib", str(binary), "--catalog", str(cat)),
        ("pools", "discover", str(ckpt), "--name", "x", "--calib", str(tmp_path / "missing.txt"), "--catalog", str(cat)),
        ("pools", "discover", str(ckpt), "--name", "x", "--calib", str(files["digits"]), "--experts", "17",
         "--catalog", str(cat)),
        ("pools", "discover", str(ckpt), "--name", "x", "--calib", str(files["digits"]), "--experts", "3",
         "--catalog", str(cat)),
        ("pools", "discover", str(ckpt), "--name", "digits", "--calib", str(files["letters"]), "--experts", "8",
         "--catalog", str(cat)),  # exists: needs --force
        ("pools", "show", "digits", str(foreign_ckpt), "--catalog", str(cat)),  # entry from another checkpoint
        ("eval", str(foreign_ckpt), "--pool", str(cat / "digits.json"), "--text", str(files["digits"])),
    ]
    for n, args in enumerate(cases):
        r = run_cli(*args) if n == 0 else invoke(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert _snapshot(cat) == before, args
