"""Swappable bundles and the pool-swapping runtime (issue 6), on a tiny planted checkpoint.

Acceptance pinned here: after any sequence of swaps the logits under pool P equal those of the static bundle
exported for P (bit for bit, int4 and fp32); a corrupted expert shard is refused naming the expert and layer
while the runtime keeps serving; a budget below backbone + one pool and a foreign pool are clear errors (exit 2
in the CLI); `auto` picks the planted pool for in-domain prompts; concurrent requests never see a half-swapped
pool."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from emo_edge.commands.logits import bundle_logits
from emo_edge.engine import StaticEngine
from emo_edge.errors import BudgetError, BundleError, PoolError
from emo_edge.export.pipeline import export
from emo_edge.engine.swappable import SwappableEngine, mapped
from emo_edge.model.synth import PRESETS, digits_doc, letters_doc, synthesize
from exporters.swappable import export_swappable

ROOT = Path(__file__).resolve().parents[2]
IDS = [5, 17, 99, 3, 250, 7, 8, 9, 300, 41]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("swap")
    ckpt = d / "ckpt"
    synthesize(ckpt, PRESETS["tiny"], plant=True)
    groups = json.loads((ckpt / "synth.json").read_text())["plant"]["groups"]
    n_layers = len(groups)
    pools = {}
    for dom in ("digits", "letters"):
        p = d / f"{dom}.json"
        p.write_text(json.dumps({"layers": [groups[str(i)][dom] for i in range(n_layers)]}))
        pools[dom] = p
    # a third pool overlapping both
    mixed = d / "mixed.json"
    mixed.write_text(json.dumps({"layers": [[groups[str(i)]["digits"][0], groups[str(i)]["letters"][0]]
                                            for i in range(n_layers)]}))
    pools["mixed"] = mixed
    out = {"ckpt": ckpt, "pools": pools, "dir": d}
    for prec in ("int4", "fp32"):
        for name, p in pools.items():
            export(ckpt, str(p), None, 128, "cpu", prec, d / f"static-{name}-{prec}", True, False, progress=False)
        export_swappable(ckpt, ",".join(str(p) for p in pools.values()), None, 128, "cpu", prec,
                         d / f"swap-{prec}", True, False, progress=False)
    return out


@pytest.mark.parametrize("prec,mechanism", [("int4", "mapped"), ("int4", "rebuild"), ("fp32", "auto")])
def test_logits_equal_static_after_any_swaps(world, prec, mechanism):
    d = world["dir"]
    static = {n: StaticEngine(d / f"static-{n}-{prec}").logits(IDS) for n in world["pools"]}
    rt = SwappableEngine(d / f"swap-{prec}", mechanism=mechanism)
    assert rt.mechanism == {"int4": mechanism, "fp32": "rebuild"}[prec]
    seq = ["digits", "letters", "mixed", "digits", "digits", "mixed", "letters", "digits"]
    reads = []
    for name in seq:
        st = rt.use(name)
        reads.append(st.experts_read)
        got = rt.logits(IDS)
        assert np.array_equal(got, static[name]), (name, float(np.abs(got - static[name]).max()))
    # experts already resident (active or cached) are never read twice
    assert reads[0] > 0 and sum(reads[3:]) == 0
    assert rt.swaps[4].noop
    rt.close()


def test_swappable_logits_hook_and_pool_file(world):
    d = world["dir"]
    want = StaticEngine(d / "static-letters-int4").logits(IDS)
    assert np.array_equal(bundle_logits(d / "swap-int4", IDS, "letters", None), want)
    assert np.array_equal(bundle_logits(d / "swap-int4", IDS, str(world["pools"]["letters"]), None), want)
    with pytest.raises(PoolError, match="give --pool"):
        bundle_logits(d / "swap-int4", IDS, None, None)


def test_cli_logits_swappable_equals_static(world, tmp_path):
    """The acceptance, from the command line: `logits SWAPPABLE --pool P` equals `logits STATIC_P`."""
    d = world["dir"]
    ids = ",".join(map(str, IDS))
    outs = {}
    for key, args in (("swap", [str(d / "swap-int4"), "--pool", "letters"]), ("static", [str(d / "static-letters-int4")])):
        out = tmp_path / f"{key}.npy"
        r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "logits", *args, "--ids", ids, "--out", str(out)],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        outs[key] = np.load(out)
    assert outs["swap"].shape == (len(IDS), outs["static"].shape[1])
    assert np.array_equal(outs["swap"], outs["static"])


def test_layout_and_manifest(world):
    m = json.loads((world["dir"] / "swap-int4" / "manifest.json").read_text())
    sw = m["swappable"]
    assert m["kind"] == "swappable" and set(sw["pools"]) == {"digits", "letters", "mixed"}
    for moe in sw["moe"]:
        ids = [e["source_id"] for e in moe["experts"]]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)  # overlapping pools: each expert stored once
        assert all(e["offset"] % 4096 == 0 for e in moe["experts"])
    assert not (world["dir"] / "swap-int4" / "model.onnx").exists()


def _corrupt_copy(world, tmp_path) -> Path:
    src = world["dir"] / "swap-int4"
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    moe = m["swappable"]["moe"][1]
    letters = set(json.loads(world["pools"]["letters"].read_text())["layers"][moe["layer"]])
    victim = next(e for e in moe["experts"] if e["source_id"] in letters)
    with open(dst / moe["shard"], "r+b") as f:
        f.seek(victim["offset"] + 10)
        b = f.read(1)
        f.seek(victim["offset"] + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    return dst, moe["layer"], victim["source_id"]


def test_corrupted_shard_refused_and_runtime_keeps_serving(world, tmp_path):
    """Rebuild mechanism (per-pool sessions read from the shards): the swap is refused, the old pool serves."""
    bad, layer, expert = _corrupt_copy(world, tmp_path)
    rt = SwappableEngine(bad, mechanism="rebuild")
    rt.use("digits")
    before = rt.logits(IDS)
    with pytest.raises(BundleError, match=rf"expert {expert} of layer {layer} fails its sha256"):
        rt.use("letters")
    assert rt.active_name == "digits"
    assert np.array_equal(rt.logits(IDS), before)
    out = rt.generate(IDS, pool=None, max_tokens=3)
    assert out.pool == "digits" and len(out.ids) == 3
    rt.close()


def test_corrupted_shard_refused_when_preparing(world, tmp_path, monkeypatch):
    """Mapped mechanism: the shards are read (and verified) when the per-machine store is prepared; a bad record
    names the expert and layer and leaves no store behind."""
    bad, layer, expert = _corrupt_copy(world, tmp_path)
    monkeypatch.setenv("EMO_EDGE_HOME", str(tmp_path / "home"))
    with pytest.raises(BundleError, match=rf"expert {expert} of layer {layer} fails its sha256"):
        SwappableEngine(bad, mechanism="mapped")
    store = mapped.store_dir(bad)
    assert not store.exists() and not (store.parent.exists() and any(store.parent.iterdir()))


def _file_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (smaps)."""
    want, total, inside = str(Path(path).resolve()), 0, False
    for line in open("/proc/self/smaps"):
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and all(c in "0123456789abcdef-" for c in head[0]):
            inside = len(head) == 6 and head[5].strip() == want
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_mapped_store_corruption_refused_and_residency(world, tmp_path, monkeypatch):
    """Mapped mechanism: only the active (and cached) experts' pages are resident; evicted ones leave memory; an
    expert whose prepared bytes fail their sha256 on load makes the runtime prepare the store again (once, with a
    notice) and the swap then succeeds with the right logits."""
    monkeypatch.setenv("EMO_EDGE_HOME", str(tmp_path / "home"))
    said = []
    rt = SwappableEngine(world["dir"] / "swap-int4", mechanism="mapped", progress=said.append)
    assert rt.mechanism == "mapped"
    L = rt.layers[1]
    ml = L.mapped
    assert _file_rss(ml.data_path) == 0  # opening drops every page onnxruntime touched
    rt.use("digits")
    before = rt.logits(IDS)
    pages = sum(ml.resident_bytes(e) for e in ml.resident)
    assert ml.resident == {L.pos[s] for s in L.active}
    # running touches nothing outside the pool's pages but the router's and the kernels' small metadata
    assert pages <= _file_rss(ml.data_path) <= pages + 64 * 1024
    # evicting really frees the pages
    for e in list(ml.resident):
        ml.evict(e)
        rt.lru.pop((1, e), None)
    assert _file_rss(ml.data_path) <= 64 * 1024
    rt.use("mixed")
    rt.use("digits")
    assert np.array_equal(rt.logits(IDS), before)
    # corrupt one letters expert that is not resident, in the prepared store
    letters = set(json.loads(world["pools"]["letters"].read_text())["layers"][L.layer])
    victim = next(s for s in sorted(letters) if L.pos[s] not in ml.resident)
    (a, _), _ = ml.ranges(L.pos[victim])
    with open(ml.data_path, "r+b") as f:
        f.seek(a + 3)
        byte = f.read(1)
        f.seek(a + 3)
        f.write(bytes([byte[0] ^ 0x5A]))
    said.clear()
    rt.use("letters")
    assert any(f"expert {victim} of layer {L.layer} fails its sha256" in m and "preparing again" in m for m in said)
    assert rt.active_name == "letters"
    assert np.array_equal(rt.logits(IDS), StaticEngine(world["dir"] / "static-letters-int4").logits(IDS))
    assert np.array_equal(rt.logits(IDS, pool="digits"), before)
    rt.close()


def test_cli_errors_exit_2(world, tmp_path):
    bad, layer, expert = _corrupt_copy(world, tmp_path)
    cli = [sys.executable, str(ROOT / "cli.py"), "chat"]
    env = dict(os.environ, EMO_EDGE_HOME=str(tmp_path / "home"))
    r = subprocess.run(cli + [str(bad), "--pool", "letters", "--prompt", "hello", "--max-new-tokens", "2"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2 and f"expert {expert} of layer {layer}" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cli + [str(world["dir"] / "swap-int4"), "--budget", "20MB", "--prompt", "hi"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2 and "budget" in r.stderr and "Traceback" not in r.stderr
    # interactive chat: a bad swap is reported and the chat keeps serving (rebuild mechanism: swaps read shards)
    r = subprocess.run(cli + [str(bad), "--pool", "digits", "--max-new-tokens", "2"],
                       input="1 + 2\n/pool letters\n3 + 4\n/quit\n", capture_output=True, text=True, cwd=ROOT,
                       env=dict(env, EMO_EDGE_SWAP="rebuild"))
    assert r.returncode == 0, r.stderr
    assert "fails its sha256" in r.stderr and r.stderr.count("[pool digits") == 2


def test_budget_below_backbone_plus_pool(world):
    with pytest.raises(BudgetError, match="below"):
        SwappableEngine(world["dir"] / "swap-int4", budget="60MB")


def test_foreign_pool_and_bundle(world, tmp_path):
    rt = SwappableEngine(world["dir"] / "swap-int4")
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"layers": [[0, 1, 2]] * 5}))
    with pytest.raises(PoolError, match="layers"):
        rt.use(str(bad))
    rt.close()
    # a static bundle is not swappable; a segment from another bundle fails its checksum
    with pytest.raises(BundleError, match="not a swappable bundle"):
        SwappableEngine(world["dir"] / "static-digits-int4")
    mix = tmp_path / "mix"
    shutil.copytree(world["dir"] / "swap-int4", mix)
    shutil.copyfile(world["dir"] / "swap-fp32" / "backbone.data", mix / "backbone.data")
    with pytest.raises(BundleError, match="backbone.data"):
        SwappableEngine(mix)


def test_auto_picks_planted_pool(world):
    rt = SwappableEngine(world["dir"] / "swap-int4")
    rng = random.Random(3)
    for dom, make in (("digits", digits_doc), ("letters", letters_doc)):
        for _ in range(2):
            res = rt.generate(rt.tokenizer.encode(make(rng))[:60], pool="auto", max_tokens=2)
            assert res.pool == dom, res.reason
            assert "coverage" in res.reason
    res = rt.generate(rt.tokenizer.encode(digits_doc(rng))[:60], pool="doc", max_tokens=2)
    assert res.pool == "ad-hoc" and "top-N" in res.reason
    rt.close()


def test_concurrent_requests_never_see_half_swapped_pool(world):
    d = world["dir"]
    static = {n: StaticEngine(d / f"static-{n}-int4").logits(IDS) for n in ("digits", "letters", "mixed")}
    rt = SwappableEngine(d / "swap-int4")
    errors = []

    def worker(k):
        try:
            for j in range(6):
                name = ("digits", "letters", "mixed")[(k + j) % 3]
                got = rt.logits(IDS, pool=name)
                if not np.array_equal(got, static[name]):
                    errors.append((k, j, name))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rt.close()


def test_unwritable_store_falls_back_to_rebuild(world, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("EMO_EDGE_HOME", str(blocker))
    said = []
    rt = SwappableEngine(world["dir"] / "swap-int4", progress=said.append)
    assert rt.mechanism == "rebuild" and any("rebuilding sessions instead" in s for s in said)
    assert np.array_equal(rt.logits(IDS, pool="digits"), StaticEngine(world["dir"] / "static-digits-int4").logits(IDS))
    rt.close()
    with pytest.raises(BundleError, match="cannot write the prepared store"):
        SwappableEngine(world["dir"] / "swap-int4", mechanism="mapped")


def test_mapped_budget_evicts_lru_and_refuses_what_cannot_fit(world, tmp_path, monkeypatch):
    """The eviction policy under a budget that fits one pool but not two, with RSS modelled exactly as
    backbone + resident expert pages (so the check does not depend on allocator noise at this tiny size)."""
    import emo_edge.engine.memory as runtime

    rt = SwappableEngine(world["dir"] / "swap-int4", mechanism="mapped", max_tokens=16)
    base = 100 * 2**20

    def modelled_rss():
        return base + sum(rt.layers[m].mapped.resident_bytes(e) for m, e in rt.lru)

    monkeypatch.setattr(runtime, "rss", modelled_rss)
    rt.backbone_rss = base
    sizes = {}
    for name in ("digits", "letters", "mixed"):
        _, target = rt.resolve(name)
        sizes[name] = sum(L.mapped.resident_bytes(L.pos[s]) for L, ids in zip(rt.layers, target) for s in ids)
    reserve = rt.kv_bytes() + rt.activation_bytes()
    rt.budget = base + reserve + max(sizes.values()) + 1
    assert rt.budget < base + reserve + sizes["digits"] + sizes["letters"]  # one pool fits, two do not
    static = {n: StaticEngine(world["dir"] / f"static-{n}-int4").logits(IDS) for n in sizes}
    for name in ("digits", "letters", "mixed", "letters", "digits"):
        rt.use(name)
        assert modelled_rss() + reserve <= rt.budget
        assert np.array_equal(rt.logits(IDS), static[name])
        assert {k for k in rt.lru} >= {(m, L.pos[s]) for m, L in enumerate(rt.layers) for s in L.active}
    # a budget that cannot hold the pool even after evicting everything: refused, old pool intact
    was = rt.active_name
    rt.budget = base + reserve + sizes["letters"] // 2
    other = "letters" if was != "letters" else "digits"
    with pytest.raises(BudgetError, match=f"swap to '{other}'"):
        rt.use(other)
    assert rt.active_name == was and np.array_equal(rt.logits(IDS), static[was])
    rt.close()
