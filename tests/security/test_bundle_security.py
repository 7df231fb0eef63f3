"""Crafted bundles (issue 14, bundle side): nothing outside the bundle is read, nothing loaded escapes a sha256
or a zero check, every JSON is validated before use, a corrupted prepared store is prepared again, and a deleted
or replaced shard is one line naming what keeps serving.

Each crafted bundle is a copy of one exported here (module-scoped), with its manifest re-hashed where the point is
that containment alone must stop it. Exit codes are checked through the CLI: status 2, one `error:` line, no
traceback."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from emo_edge.bundle.files import check_files, pool_matches, read_manifest
from emo_edge.engine import StaticEngine
from emo_edge.errors import BundleError, PoolError
from emo_edge.export.pipeline import export
from emo_edge.engine.swappable import SwappableEngine, mapped
from emo_edge.model.synth import PRESETS, synthesize
from exporters.swappable import export_swappable

IDS = [5, 17, 99, 3, 250, 7]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("secure")
    ckpt = d / "ckpt"
    synthesize(ckpt, PRESETS["tiny"], plant=True)
    groups = json.loads((ckpt / "synth.json").read_text())["plant"]["groups"]
    pools = {}
    for dom in ("digits", "letters"):
        p = d / f"{dom}.json"
        p.write_text(json.dumps({"layers": [groups[str(i)][dom] for i in range(len(groups))]}))
        pools[dom] = p
    export(ckpt, str(pools["digits"]), None, 128, "cpu", "int4", d / "static", True, False, progress=False)
    export_swappable(ckpt, ",".join(str(p) for p in pools.values()), None, 128, "cpu", "int4", d / "swap", True,
                     False, progress=False)
    return {"dir": d, "pools": pools, "static": d / "static", "swap": d / "swap"}


def copy(world, kind: str, tmp_path: Path) -> Path:
    dst = tmp_path / kind
    shutil.copytree(world[kind], dst)
    return dst


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_manifest(root: Path, change, rehash: bool = True) -> dict:
    """Apply `change(manifest)` and, with rehash, recompute the size and sha256 of every listed file: the crafted
    bundle is self-consistent, so only the loader's containment/coverage rules can stop it."""
    m = json.loads((root / "manifest.json").read_text())
    change(m)
    if rehash:
        for name, entry in m["files"].items():
            p = root / name
            if p.is_file():
                entry.update(bytes=p.stat().st_size, sha256=sha(p))
    (root / "manifest.json").write_text(json.dumps(m))
    return m


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def cli_refuses(*args: str, env: dict | None = None) -> str:
    """The CLI exits 2 with one `error:` line and no traceback; returns that line."""
    r = run_cli(*args, env=env)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def run_static(bundle: Path) -> str:
    return cli_refuses("run", str(bundle), "--prompt", "12", "--max-new-tokens", "2")


def chat(bundle: Path, home: Path, *extra: str):
    return run_cli("chat", str(bundle), "--pool", "digits", "--prompt", "12 34", "--max-new-tokens", "2", *extra,
                   env={"EMO_EDGE_HOME": str(home)})


# ---------------------------------------------------------------------------------------------------------
# 1. paths a bundle file names: confined and covered
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_genai_decoder_filename_outside_refused(world, tmp_path, how):
    b = copy(world, "static", tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copyfile(b / name, outside / name)
    target = str(outside / "model.onnx") if how == "absolute" else "../elsewhere/model.onnx"
    g = json.loads((b / "genai_config.json").read_text())
    g["model"]["decoder"]["filename"] = target
    (b / "genai_config.json").write_text(json.dumps(g))
    edit_manifest(b, lambda m: None)  # genai_config.json re-hashed: only containment stops it
    if how == "absolute":
        line = run_static(b)
    else:
        line = cli_refuses("logits", str(b), "--ids", "1,2", "--out", str(tmp_path / "x.npy"))
        assert not (tmp_path / "x.npy").exists()
    assert "genai_config.json" in line and "decoder.filename" in line and "outside" in line


def test_genai_decoder_filename_unlisted_refused(world, tmp_path):
    """A graph inside the bundle but not in `files` is not loaded."""
    b = copy(world, "static", tmp_path)
    shutil.copyfile(b / "model.onnx", b / "other.onnx")
    g = json.loads((b / "genai_config.json").read_text())
    g["model"]["decoder"]["filename"] = "other.onnx"
    (b / "genai_config.json").write_text(json.dumps(g))
    edit_manifest(b, lambda m: None)
    with pytest.raises(BundleError, match=r"decoder.filename.*'other.onnx' is not listed"):
        StaticEngine(b)


@pytest.mark.parametrize("field,value", [
    ("segments[0].file", "../swap/seg0.onnx"),
    ("segments[1].file", "/etc/hostname"),
    ("routers", "../swap/routers.bin"),
    ("backbone_data", "/etc/hostname"),
    ("moe[0].shard", "../swap/experts.l0.bin"),
    ("moe[1].template", "/tmp/moe1.onnx"),
])
def test_swappable_paths_outside_refused(world, tmp_path, field, value):
    b = copy(world, "swap", tmp_path)

    def change(m):
        obj, key = m["swappable"], field
        if "." in field:
            head, key = field.split(".")
            name, idx = head.rstrip("]").split("[")
            obj = obj[name][int(idx)]
        obj[key] = value

    edit_manifest(b, change)
    want = f"field 'swappable.{field}'"
    with pytest.raises(BundleError, match="outside") as e:
        SwappableEngine(b, mechanism="rebuild")
    assert want in str(e.value)


def test_swappable_segment_dotdot_cli(world, tmp_path):
    b = copy(world, "swap", tmp_path)
    edit_manifest(b, lambda m: m["swappable"]["segments"][0].update(file="../../swap/seg0.onnx"))
    line = cli_refuses("chat", str(b), "--pool", "digits", "--prompt", "1", env={"EMO_EDGE_HOME": str(tmp_path)})
    assert "segments[0].file" in line and "outside" in line


# ---------------------------------------------------------------------------------------------------------
# 2. the manifest covers everything loaded
# ---------------------------------------------------------------------------------------------------------
def test_dropped_then_corrupted_data_file_refused(world, tmp_path):
    """model.onnx.data left out of `files` and corrupted: refused, because the graph names it."""
    b = copy(world, "static", tmp_path)
    edit_manifest(b, lambda m: m["files"].pop("model.onnx.data"))
    flip(b / "model.onnx.data", 100)
    line = run_static(b)
    assert "model.onnx.data" in line and "not listed" in line


@pytest.mark.parametrize("name", ["genai_config.json", "tokenizer.json", "model.onnx"])
def test_static_file_dropped_from_files_refused(world, tmp_path, name):
    b = copy(world, "static", tmp_path)
    edit_manifest(b, lambda m: m["files"].pop(name))
    with pytest.raises(BundleError, match=f"'{name}' is not listed"):
        StaticEngine(b).tokenizer


@pytest.mark.parametrize("name", ["seg1.onnx", "backbone.data", "routers.bin", "moe0.onnx", "experts.l1.bin",
                                  "tokenizer.json"])
def test_swappable_file_dropped_from_files_refused(world, tmp_path, name):
    b = copy(world, "swap", tmp_path)
    edit_manifest(b, lambda m: m["files"].pop(name))
    with pytest.raises(BundleError, match=f"'{name}' is not listed"):
        SwappableEngine(b, mechanism="rebuild").tokenizer


def test_overlapping_record_refused(world, tmp_path):
    b = copy(world, "swap", tmp_path)
    m = edit_manifest(b, lambda m: m["swappable"]["moe"][0]["experts"][2].update(
        offset=m["swappable"]["moe"][0]["experts"][1]["offset"]))
    assert m["swappable"]["moe"][0]["experts"][2]["offset"] == m["swappable"]["moe"][0]["experts"][1]["offset"]
    line = cli_refuses("chat", str(b), "--pool", "digits", "--prompt", "1", env={"EMO_EDGE_HOME": str(tmp_path)})
    assert "swappable.moe[0].experts[2].offset" in line and "overlaps experts[1]" in line


@pytest.mark.parametrize("change,match", [
    (lambda mo: mo["experts"][0].update(offset=mo["record_stride"] * len(mo["experts"])), "not a record slot"),
    (lambda mo: mo["experts"][0].update(offset=100), "not a record slot"),
    (lambda mo: mo.update(record_stride=mo["record_bytes"] - 1), "below record_bytes"),
    (lambda mo: mo.update(record_bytes=mo["record_bytes"] + 1), "parts add up"),
    (lambda mo: mo["parts"][0].update(nbytes=mo["parts"][0]["nbytes"] * 2), "nbytes"),
    (lambda mo: mo["router"].update(offset=1 << 20), "does not fit"),
    (lambda mo: mo["experts"].pop(), "records of stride"),
])
def test_inconsistent_shard_layout_refused(world, tmp_path, change, match):
    b = copy(world, "swap", tmp_path)
    edit_manifest(b, lambda m: change(m["swappable"]["moe"][1]))
    with pytest.raises(BundleError, match=match):
        SwappableEngine(b, mechanism="rebuild")


@pytest.mark.parametrize("mechanism", ["rebuild", "mapped"])
def test_nonzero_shard_padding_refused(world, tmp_path, monkeypatch, mechanism):
    """Padding between records is outside every record's sha256: it must be zero when read."""
    b = copy(world, "swap", tmp_path)
    monkeypatch.setenv("EMO_EDGE_HOME", str(tmp_path / "home"))
    m = read_manifest(b)
    mo = m["swappable"]["moe"][0]
    rec = mo["experts"][1]
    assert mo["record_stride"] > mo["record_bytes"]
    flip(b / mo["shard"], rec["offset"] + mo["record_bytes"] + 5)
    edit_manifest(b, lambda m: None)  # the whole-file sha256 re-hashed: only the zero check can stop it
    if mechanism == "mapped":  # the store is prepared from the shards at open
        with pytest.raises(BundleError, match=f"padding after expert {rec['source_id']} of layer 0 is not zero"):
            SwappableEngine(b, mechanism="mapped")
        return
    rt = SwappableEngine(b, mechanism="rebuild")
    with pytest.raises(BundleError, match=f"padding after expert {rec['source_id']} of layer 0 is not zero.*"
                                          "no pool loaded yet"):
        rt.use("digits" if rec["source_id"] in rt.pools["digits"][0] else "letters")
    rt.close()


# ---------------------------------------------------------------------------------------------------------
# 3. symlinks leaving the bundle
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tokenizer.json", "model.onnx.data", "manifest.json"])
def test_symlink_out_of_bundle_refused(world, tmp_path, name):
    b = copy(world, "static", tmp_path)
    outside = tmp_path / f"outside-{name}"
    shutil.move(b / name, outside)
    os.symlink(outside, b / name)  # same bytes: the sha256 matches, only containment stops it
    if name == "manifest.json":
        line = run_static(b)
        assert name in line and "outside" in line
    else:
        with pytest.raises(BundleError, match=f"{name}.*resolves outside"):
            StaticEngine(b)


def test_symlink_inside_bundle_accepted(world, tmp_path):
    b = copy(world, "static", tmp_path)
    shutil.move(b / "tokenizer.json", b / "tok-real.json")
    os.symlink("tok-real.json", b / "tokenizer.json")
    assert StaticEngine(b).tokenizer.encode("12")


# ---------------------------------------------------------------------------------------------------------
# 5. typed schemas: wrong types, missing keys, negative/huge numbers, NaN, deep nesting
# ---------------------------------------------------------------------------------------------------------
def test_manifest_nan_refused_cli(world, tmp_path):
    b = copy(world, "swap", tmp_path)
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text.replace('"routed_k": 2', '"routed_k": NaN', 1))
    line = cli_refuses("chat", str(b), "--pool", "digits", "--prompt", "1", env={"EMO_EDGE_HOME": str(tmp_path)})
    assert "manifest.json" in line and "NaN" in line


@pytest.mark.parametrize("change,field", [
    (lambda m: m["swappable"]["moe"][0]["router"].update(offset=-1), "swappable.moe.0.router.offset"),
    (lambda m: m["swappable"]["moe"][0].update(record_bytes=10 ** 15), "swappable.moe.0.record_bytes"),
    (lambda m: m["swappable"]["moe"][1]["experts"][0].update(sha256="zz"), "swappable.moe.1.experts.0.sha256"),
    (lambda m: m["swappable"]["moe"][0].pop("shard"), "swappable.moe.0.shard"),
    (lambda m: m["swappable"]["segments"][0].update(file=7), "swappable.segments.0.file"),
    (lambda m: m["swappable"]["pools"]["digits"][0].append("3"), "swappable.pools.digits.0"),
    (lambda m: m["files"]["seg0.onnx"].update(bytes=-5), "files.seg0.onnx.bytes"),
    (lambda m: m.update(experts={"a": 1}), "experts"),
])
def test_swappable_manifest_field_refused(world, tmp_path, change, field):
    b = copy(world, "swap", tmp_path)
    edit_manifest(b, change, rehash=False)
    with pytest.raises(BundleError) as e:
        SwappableEngine(b, mechanism="rebuild")
    msg = str(e.value)
    assert "manifest.json: field '" in msg and "\n" not in msg
    assert msg.split("field '")[1].split("'")[0].replace("[", ".").replace("]", "").startswith(field), msg


@pytest.mark.parametrize("key,value", [("context_length", 10 ** 15), ("vocab_size", -1), ("vocab_size", 2.5),
                                       ("decoder.num_hidden_layers", 10 ** 8), ("decoder.head_size", "16")])
def test_genai_config_field_refused(world, tmp_path, key, value):
    b = copy(world, "static", tmp_path)
    g = json.loads((b / "genai_config.json").read_text())
    obj = g["model"]
    *path, last = key.split(".")
    for k in path:
        obj = obj[k]
    obj[last] = value
    (b / "genai_config.json").write_text(json.dumps(g))
    edit_manifest(b, lambda m: None)
    with pytest.raises(BundleError, match=rf"genai_config.json: field 'model.{key}'"):
        StaticEngine(b)


def test_genai_dims_disagree_with_graph_refused(world, tmp_path):
    b = copy(world, "static", tmp_path)
    g = json.loads((b / "genai_config.json").read_text())
    g["model"]["decoder"]["num_hidden_layers"] += 1
    (b / "genai_config.json").write_text(json.dumps(g))
    edit_manifest(b, lambda m: None)
    with pytest.raises(BundleError, match="num_hidden_layers.*graph"):
        StaticEngine(b)


def test_deep_and_huge_manifest_refused(world, tmp_path):
    b = copy(world, "static", tmp_path)
    (b / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(BundleError, match="nested deeper"):
        read_manifest(b)
    with open(b / "manifest.json", "wb") as f:
        f.truncate(65 << 20)
    with pytest.raises(BundleError, match="larger than"):
        read_manifest(b)


@pytest.mark.parametrize("content,field", [('{"layers": [[0, -1, 2], null]}', "layers[0][1]"),
                                           ('{"layers": [[0, 1], NaN]}', "NaN"),
                                           ('{"layer": []}', "layers")])
def test_pool_file_given_with_bundle_refused(world, tmp_path, content, field):
    pool = tmp_path / "pool.json"
    pool.write_text(content)
    if field == "NaN":
        line = cli_refuses("logits", str(world["static"]), "--ids", "1,2", "--pool", str(pool), "--out",
                           str(tmp_path / "x.npy"))
        assert "pool.json" in line and field in line
    with pytest.raises(BundleError, match=rf"pool.json.*{re.escape(field)}"):
        pool_matches(read_manifest(world["static"]), pool)
    rt = SwappableEngine(world["swap"], mechanism="rebuild")
    with pytest.raises(PoolError, match="pool.json"):
        rt.use(str(pool))
    rt.close()


def test_manifest_model_dims_without_genai_config(world, tmp_path):
    """Newer swappable bundles carry the decoder dims in the manifest (`swappable.model`) and no
    genai_config.json; older ones (the fixture, if it has genai_config.json) load from the file."""
    b = copy(world, "swap", tmp_path)
    ref = SwappableEngine(world["swap"], mechanism="rebuild")
    want = ref.logits(IDS, pool="digits")
    ref.close()
    dims = json.loads((world["static"] / "genai_config.json").read_text())["model"]

    def change(m):
        m["swappable"]["model"] = dims
        m["files"].pop("genai_config.json", None)
    (b / "genai_config.json").unlink(missing_ok=True)
    edit_manifest(b, change)
    rt = SwappableEngine(b, mechanism="rebuild")
    assert np.array_equal(rt.logits(IDS, pool="digits"), want)
    rt.close()
    edit_manifest(b, lambda m: m["swappable"]["model"].update(vocab_size=float("nan")), rehash=False)
    with pytest.raises(BundleError, match="manifest.json"):
        SwappableEngine(b, mechanism="rebuild")


# ---------------------------------------------------------------------------------------------------------
# 9. a corrupted prepared store is prepared again
# ---------------------------------------------------------------------------------------------------------
def _corrupt_prepared_json(store: Path) -> None:
    (store / "prepared.json").write_text('{"version": 1, "layers": [')


def _negative_region(store: Path) -> None:
    info = json.loads((store / "prepared.json").read_text())
    info["layers"][0]["fc1"]["offset"] = -4
    (store / "prepared.json").write_text(json.dumps(info))


def _escaping_data(store: Path) -> None:
    info = json.loads((store / "prepared.json").read_text())
    info["layers"][1]["data"] = "../../../../etc/hostname"
    (store / "prepared.json").write_text(json.dumps(info))


def _truncated_data(store: Path) -> None:
    with open(store / "moe0.data", "r+b") as f:
        f.truncate(100)


def _flipped_data(store: Path) -> None:
    info = json.loads((store / "prepared.json").read_text())
    flip(store / "moe1.data", info["layers"][1]["fc2"]["offset"] + 7)


def _flipped_router(store: Path) -> None:
    """The router's raw weights: not an expert, not validated by onnxruntime; used by the routing."""
    import onnx

    g = onnx.load(str(store / "moe0.onnx"), load_external_data=False)
    t = next(t for t in g.graph.initializer if t.name.endswith("router.weight_T"))
    off = int(next(e.value for e in t.external_data if e.key == "offset"))
    flip(store / "moe0.data", off + 10)


@pytest.mark.parametrize("damage", [_corrupt_prepared_json, _negative_region, _escaping_data, _truncated_data,
                                    _flipped_data, _flipped_router])
def test_corrupted_prepared_store_is_prepared_again(world, tmp_path, monkeypatch, damage):
    """The store is ours: whatever is wrong with it, `chat` prepares it again (notice) and serves; exit 0."""
    home = tmp_path / "home"
    monkeypatch.setenv("EMO_EDGE_HOME", str(home))
    SwappableEngine(world["swap"], mechanism="mapped").close()
    store = mapped.store_dir(world["swap"])
    assert (store / "prepared.json").is_file()
    damage(store)
    if damage is _flipped_data:  # through the CLI: exit 0, a notice
        r = chat(world["swap"], home)
        assert r.returncode == 0, r.stderr
        assert "preparing again" in r.stderr and "Traceback" not in r.stderr
    else:
        said = []
        rt = SwappableEngine(world["swap"], mechanism="mapped", progress=said.append)
        assert any("preparing again" in m for m in said), said
        ref = SwappableEngine(world["swap"], mechanism="rebuild")
        assert np.array_equal(rt.logits(IDS, pool="letters"), ref.logits(IDS, pool="letters"))
        ref.close()
        rt.close()
    said = []  # and the store is whole again: the next open prepares nothing
    rt = SwappableEngine(world["swap"], mechanism="mapped", progress=said.append)
    assert rt.mechanism == "mapped" and not said
    rt.close()


def test_store_corrupted_while_serving_is_prepared_again_once(world, tmp_path, monkeypatch):
    """An expert of the store failing its sha256 at a swap: the store is prepared again (notice) and the swap
    succeeds; a second corruption in the same runtime is an error that says what keeps serving."""
    monkeypatch.setenv("EMO_EDGE_HOME", str(tmp_path / "home"))
    said = []
    rt = SwappableEngine(world["swap"], mechanism="mapped", progress=said.append)
    rt.use("digits")
    digits = rt.logits(IDS)

    def spoil(pool: str) -> None:
        L = rt.layers[0]
        s = next(s for s in rt.pools[pool][L.layer] if L.pos[s] not in L.mapped.resident)
        (a, _), _ = L.mapped.ranges(L.pos[s])
        flip(L.mapped.data_path, a + 1)

    spoil("letters")
    said.clear()
    rt.use("letters")
    assert any("corrupted" in s and "preparing again" in s for s in said), said
    letters = rt.logits(IDS)
    fresh = SwappableEngine(world["swap"], mechanism="rebuild")
    assert np.array_equal(letters, fresh.logits(IDS, pool="letters"))
    fresh.close()
    rt.use("digits")
    assert np.array_equal(rt.logits(IDS), digits)
    for e in list(rt.layers[0].mapped.resident):  # only the active pool's pages stay resident
        if rt.layers[0].ids[e] not in rt.pools["digits"][0]:
            rt.layers[0].mapped.evict(e)
            rt.lru.pop((0, e), None)
    spoil("letters")
    with pytest.raises(BundleError, match="fails its sha256 check.*still serving pool 'digits'"):
        rt.use("letters")
    assert np.array_equal(rt.logits(IDS), digits)
    rt.close()


# ---------------------------------------------------------------------------------------------------------
# 10. deleted or replaced shards
# ---------------------------------------------------------------------------------------------------------
def test_deleted_shard_refused_cli(world, tmp_path):
    b = copy(world, "swap", tmp_path)
    (b / "experts.l1.bin").unlink()
    line = cli_refuses("chat", str(b), "--pool", "digits", "--prompt", "1", env={"EMO_EDGE_HOME": str(tmp_path)})
    assert "experts.l1.bin" in line


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_shard_gone_while_serving(world, tmp_path, how):
    b = copy(world, "swap", tmp_path)
    rt = SwappableEngine(b, mechanism="rebuild")
    rt.use("digits")
    before = rt.logits(IDS)
    shard = b / rt.layers[0].meta["shard"]
    if how == "deleted":
        shard.unlink()
    else:
        data = shard.read_bytes()
        shard.unlink()
        shard.write_bytes(data)  # same bytes, another file: not the one that was checked when loading
    with pytest.raises(BundleError, match=f"{shard.name}: the expert shard was deleted or replaced while serving; "
                                          "swap refused, still serving pool 'digits'"):
        rt.use("letters")
    assert rt.active_name == "digits" and np.array_equal(rt.logits(IDS), before)
    rt.close()


def test_check_files_names_the_entry(world, tmp_path):
    b = copy(world, "static", tmp_path)
    m = read_manifest(b)
    m["files"]["../static/model.onnx"] = m["files"]["model.onnx"]
    with pytest.raises(BundleError, match=r"field 'files.../static/model.onnx'.*outside"):
        check_files(b, m)


def test_graph_onnxruntime_rejects_prints_one_line_and_nothing_on_stdout(world, tmp_path):
    """A re-hashed graph that parses but that onnxruntime refuses (a node name that is not UTF-8): one `error:`
    line, and none of onnxruntime's provider-fallback chatter on stdout (it used to print four lines there and
    load the model a second time)."""
    b = copy(world, "static", tmp_path)
    raw = bytearray((b / "model.onnx").read_bytes())
    at = raw.find(b"/model/layers.0")
    assert at > 0
    raw[at + 1:at + 3] = b"\xc3\x28"  # an invalid UTF-8 sequence, same length
    (b / "model.onnx").write_bytes(bytes(raw))
    edit_manifest(b, lambda m: None)
    r = run_cli("run", str(b), "--prompt", "12", "--max-new-tokens", "2")
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "onnxruntime cannot load the model" in lines[0] and "utf-8" in lines[0], r.stderr
