"""`emo-edge export --dry-run [--json]`: the plan, and the pools that would be discovered first, with nothing
discovered, no weight read and nothing written. Every run goes through the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

from emo_edge.model.checkpoint import CheckpointView
from emo_edge.plan.search import ExportPlan, make_plan

EMBEDDED = str(ROOT / "emo_edge" / "models" / "emo-tiny")
HEAVY = re.compile(r"\|\s+(torch|onnx|onnxruntime|safetensors)(\.|\s*$)", re.M)  # -X importtime lines


def cli(*args: str, cwd: Path, home: Path, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, str(ROOT / "cli.py"), "-q", *args], capture_output=True,
                          text=True, cwd=str(cwd), env={**os.environ, "EMO_EDGE_HOME": str(home)})


def listing(*roots: Path) -> dict:
    """Every path under the roots with its size and mtime: any write, temp dir or catalog entry shows."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
        out[str(root)] = root.lstat().st_mtime_ns
    return out


@pytest.fixture
def dirs(tmp_path):
    """(cwd, the --out parent, a fresh EMO_EDGE_HOME): nothing discovered there yet."""
    d = [tmp_path / n for n in ("cwd", "outs", "home")]
    for p in d:
        p.mkdir()
    return d


def only_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_dry_run_lists_pools_to_discover_and_writes_nothing(tmp_path, dirs, variant):
    """Built-in domains a fresh catalog lacks are listed with the size discovery would give them, not
    discovered; cwd, the --out parent, $EMO_EDGE_HOME and the checkpoint are left exactly as they were."""
    from emo_edge.pools import pool_sizes

    cwd, outs, home = dirs
    ckpt = variant("shared1")
    before = listing(cwd, outs, home, ckpt)
    args = ("export", "--model", str(ckpt), "--pools", "math,code", "--budget", "4GB", "--dry-run",
            "--out", str(outs / "b"))
    text = cli(*args, cwd=cwd, home=home)
    js = cli(*args, "--json", cwd=cwd, home=home, importtime=True)
    assert listing(cwd, outs, home, ckpt) == before
    assert text.returncode == 0 and js.returncode == 0, text.stderr + js.stderr
    assert not HEAVY.search(js.stderr), HEAVY.findall(js.stderr)
    identity = CheckpointView(ckpt).identity
    spec = CheckpointView(ckpt).spec
    for name in ("math", "code"):
        entry = home / "pools" / identity[:16] / f"{name}.json"
        assert f"  {name}: built-in domain, layerwise at fraction 0.25" in text.stdout
        assert str(entry) in text.stdout and not entry.exists()
    assert "would be written to " + str(outs / "b") in text.stdout
    summary = json.loads(js.stdout)  # stdout is the JSON alone
    plan = ExportPlan.from_dict(summary["plan"])
    assert any("not discovered yet" in n and "placeholders" in n for n in plan.notes)
    sizes = pool_sizes(spec, fraction=0.25)  # what discovery would keep: counted as two disjoint pools
    for layer, kept in zip(spec.layers, plan.experts):
        assert len(kept) == min(len(layer.routed_experts), 2 * sizes[layer.index])
    assert summary["table"] in text.stdout


def test_pool_sizes_torch_free_and_exact(variant):
    """The sizes a dry run plans for a pending pool come from the one torch-free `pools.sizes.pool_sizes` that
    discovery uses; checked against an independent round-half-up (Decimal) over routing variants and 14B."""
    import subprocess
    import sys
    from decimal import ROUND_HALF_UP, Decimal

    from emo_edge.pools import discover, pool_sizes
    from emo_edge.model.spec import spec_from_config
    from emo_edge.model.synth import PRESETS, build_config

    assert discover.pool_sizes is pool_sizes
    r = subprocess.run([sys.executable, "-c", "import sys, emo_edge.export.planning; print('torch' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr
    specs = [CheckpointView(variant(n)).spec for n in ("shared1", "per_layer_dense", "always_per_layer")]
    specs.append(spec_from_config(build_config(PRESETS["emo-14b"])))
    for spec in specs:
        for f in (0.1, 0.25, 0.5, 1.0):
            want = [None if not L.num_experts else max(L.routed_k, min(len(L.routed_experts), int(
                (Decimal(str(f)) * len(L.routed_experts)).quantize(Decimal(1), ROUND_HALF_UP)))) for L in spec.layers]
            assert pool_sizes(spec, fraction=f) == want


def test_json_equals_the_plan_a_real_export_stores(dirs):
    """On the embedded model (pools shipped beside it, so nothing to discover) with a budget that forces
    trimming: --dry-run --json is report.json's plan section, and its plan is manifest.json's."""
    from emo_edge.pools import compose, resolve_pools

    cwd, outs, home = dirs
    view = CheckpointView(EMBEDDED)
    spec = view.spec
    union = compose(resolve_pools(view, ["math", "code"]))  # shipped beside the model: nothing discovered
    smallest = [list(layer.routed_experts[:layer.routed_k]) for layer in spec.layers]
    full, least = (make_plan(spec, p, None, 1024, "cpu", "int4").bytes["total"] for p in (union, smallest))
    budget = str((full + least) // 2)  # int4 with the pools' union does not fit, the minimum does
    args = ("export", "--model", EMBEDDED, "--pools", "math,code", "--budget", budget, "--context", "1024")
    before = listing(cwd, outs, home)
    dry = cli(*args, "--dry-run", "--json", "--out", str(outs / "b"), cwd=cwd, home=home)
    assert dry.returncode == 0, dry.stderr
    assert listing(cwd, outs, home) == before
    real = cli(*args, "--no-verify", "--out", str(outs / "b"), cwd=cwd, home=home)
    assert real.returncode == 0, real.stderr
    report = json.loads((outs / "b" / "report.json").read_text())
    manifest = json.loads((outs / "b" / "manifest.json").read_text())
    summary = json.loads(dry.stdout)
    assert summary == report["plan"]
    assert summary["plan"] == manifest["plan"]
    assert summary["trimmed"] and summary["estimated_bytes"] <= int(budget)
    assert not any("not discovered" in n for n in summary["notes"])


def test_impossible_budget_states_the_minimum(dirs):
    """One line, exit 2, nothing written; the stated minimum is exact: it plans, one byte less does not."""
    cwd, outs, home = dirs
    base = ("export", "--model", EMBEDDED, "--pools", "math,code", "--dry-run", "--out", str(outs / "b"))
    before = listing(cwd, outs, home)
    r = cli(*base, "--budget", "1MB", cwd=cwd, home=home)
    assert r.returncode == 2 and r.stdout == ""
    line = only_line(r.stderr)
    assert line.startswith("error: budget 1.00 MB") and "minimum model" in line, line
    minimum = int(re.search(r"minimum model: [^(]+\((\d+) bytes\)", line).group(1))
    ok = cli(*base, "--budget", str(minimum), "--json", cwd=cwd, home=home)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["estimated_bytes"] == minimum
    short = cli(*base, "--budget", str(minimum - 1), cwd=cwd, home=home)
    assert short.returncode == 2 and f"({minimum} bytes)" in only_line(short.stderr)
    assert listing(cwd, outs, home) == before


def test_json_needs_dry_run_and_swappable_plans_the_union(dirs):
    cwd, outs, home = dirs
    r = cli("export", "--model", EMBEDDED, "--pools", "math", "--json", cwd=cwd, home=home)
    assert r.returncode == 2 and "--json needs --dry-run" in only_line(r.stderr)
    base = ("export", "--model", EMBEDDED, "--pools", "math,code,prose", "--precision", "int4", "--dry-run")
    swap = cli(*base, "--swappable", "--json", cwd=cwd, home=home)
    static = cli(*base, "--json", cwd=cwd, home=home)
    assert swap.returncode == 0 and static.returncode == 0, swap.stderr + static.stderr
    assert json.loads(swap.stdout) == json.loads(static.stdout)  # the union, no budget: what export_swappable plans
    text = cli(*base, "--swappable", cwd=cwd, home=home)
    assert "the plan of the pools' union" in text.stdout and "int4-swappable" in text.stdout
    assert list(cwd.iterdir()) == [] and list(home.iterdir()) == []


def test_dry_run_at_the_14b_width_is_fast_and_reads_no_weight(tmp_path, dirs):
    """16 layers at the released width, header-only (sparse: 27 GB of holes), two 32-expert pool files whose
    union is 52 per layer: the plan in seconds, under 300 MB peak RSS (reading one expert matrix or the
    embedding would page in more), without torch or onnx."""
    from emo_edge.model.names import expected_tensors
    from emo_edge.model.spec import spec_from_config
    from emo_edge.model.synth import PRESETS, build_config
    from emo_edge.model.writer import write_checkpoint

    cwd, outs, home = dirs
    config = build_config(PRESETS["emo-14b"])
    spec = spec_from_config(config)
    shapes = {k.hf_name: s for k, s in expected_tensors(spec).items()}
    root = write_checkpoint(tmp_path / "emo14b", config, shapes, None, dtype="bf16", shard_size=5_000_000_000)
    a, b = tmp_path / "A.json", tmp_path / "B.json"
    a.write_text(json.dumps({"layers": [list(range(0, 32))] * spec.num_layers}))
    b.write_text(json.dumps({"layers": [list(range(20, 52))] * spec.num_layers}))
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(r.returncode); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)")
    cmd = [sys.executable, "-X", "importtime", str(ROOT / "cli.py"), "-q", "export", "--model", str(root),
           "--pools", f"{a},{b}", "--budget", "4GB", "--dry-run", "--json"]
    before = listing(cwd, outs, home, root)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, cwd=str(cwd),
                       env={**os.environ, "EMO_EDGE_HOME": str(home)})
    seconds = time.perf_counter() - t
    rc, maxrss_kb, body = r.stdout.split("\n", 2)
    assert rc == "0", r.stderr[-2000:]
    assert listing(cwd, outs, home, root) == before
    assert not HEAVY.search(r.stderr), HEAVY.findall(r.stderr)
    assert seconds < 30 and int(maxrss_kb) < 300 * 1024, (seconds, maxrss_kb)
    summary = json.loads(body)
    plan = ExportPlan.from_dict(summary["plan"])
    union = [list(range(52))] * spec.num_layers
    assert plan == make_plan(spec, union, 4_000_000_000, 4096, "cpu", "auto", identity=CheckpointView(root).identity)
    assert plan.context == 4096 and plan.budget == 4_000_000_000 and plan.bytes["total"] <= plan.budget
    for i, kept in enumerate(plan.experts):
        dropped = [t["expert"] for t in plan.trimmed if t["layer"] == i]
        assert sorted(kept + dropped) == list(range(52)), i


def test_known_pool_plus_pending_domain(tmp_path, monkeypatch, variant):
    """A pool file and a built-in domain not yet discovered: the file's experts are kept as they are, and the
    union grows by the domain's discovery size (capped at the routed experts); 'math,math' counts once."""
    from emo_edge.export.planning import peek_pool_layers
    from emo_edge.pools import pool_sizes

    monkeypatch.setenv("EMO_EDGE_HOME", str(tmp_path / "home"))
    view = CheckpointView(variant("shared1"))
    spec = view.spec
    mine = [list(layer.routed_experts[-3:]) for layer in spec.layers]
    (tmp_path / "mine.json").write_text(json.dumps({"layers": mine}))
    layers, desc, _, pending = peek_pool_layers(view, f"{tmp_path / 'mine.json'},math,math", spec)
    assert [p.name for p in pending] == ["math"] and [d["name"] for d in desc] == ["mine", "math"]
    sizes = pool_sizes(spec, fraction=0.25)
    for layer, kept, own in zip(spec.layers, layers, mine):
        assert set(own) <= set(kept) and len(kept) == min(len(layer.routed_experts), 3 + sizes[layer.index])
    assert not (tmp_path / "home").exists()


def test_optimize_option_chooses_among_fitting_plans(tmp_path, dirs):
    """`--optimize` reaches the planner (the dry-run JSON is make_plan's plan for it); a bad value is one line,
    exit 2, nothing written."""
    from emo_edge.model.names import expected_tensors
    from emo_edge.model.spec import spec_from_config
    from emo_edge.model.synth import PRESETS, build_config
    from emo_edge.model.writer import write_checkpoint

    cwd, outs, home = dirs
    config = build_config(PRESETS["emo-14b"], layers=2, num_experts=33)
    spec = spec_from_config(config)
    shapes = {k.hf_name: s for k, s in expected_tensors(spec).items()}
    root = write_checkpoint(tmp_path / "l2", config, shapes, None, dtype="bf16", shard_size=5_000_000_000)
    pool = tmp_path / "P.json"
    pool.write_text(json.dumps({"layers": [list(range(32))] * 2}))
    base = ("export", "--model", str(root), "--pools", str(pool), "--budget", "4GB", "--dry-run")
    plans = {}
    for opt in ("balanced", "quality", "speed"):
        r = cli(*base, "--json", "--optimize", opt, cwd=cwd, home=home)
        assert r.returncode == 0, r.stderr
        plans[opt] = ExportPlan.from_dict(json.loads(r.stdout)["plan"])
        want = make_plan(spec, [list(range(32))] * 2, 4_000_000_000, 4096, "cpu", "auto",
                         identity=CheckpointView(root).identity, optimize=opt)
        assert plans[opt] == want and plans[opt].optimize == opt
    assert plans["speed"].speed["tok_s"] >= plans["balanced"].speed["tok_s"] > plans["quality"].speed["tok_s"]
    text = cli(*base, cwd=cwd, home=home)
    assert f"{plans['balanced'].speed['tok_s']:.1f} tok/s" in text.stdout and "optimize balanced" in text.stdout
    bad = cli(*base, "--optimize", "fast", cwd=cwd, home=home)
    assert bad.returncode == 2 and "'fast' is not one of" in only_line(bad.stderr)
    assert list(cwd.iterdir()) == [] and list(outs.iterdir()) == []
