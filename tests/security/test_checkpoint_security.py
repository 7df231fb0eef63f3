"""Crafted checkpoints and inputs (issue 14, checkpoint side): every one is a one-line typed error naming the file
(and tensor or field), exit status 2 through the CLI, no traceback; the Hugging Face hub cache layout loads.

Crafted safetensors files are written here by hand with struct + json, independently of emo_edge's writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_variant, run_cli
from emo_edge.model.checkpoint import CheckpointView
from emo_edge.cli import cli
from emo_edge.errors import ConfigError, EmoEdgeError, PoolError
from emo_edge.pools.calib import MAX_DOCUMENT_CHARS, MAX_FILE_BYTES, read_documents
from emo_edge.model.spec import MAX_CONTEXT, check_context, spec_from_config


def cli_error(*args: str) -> str:
    """The one line a failing command prints; asserts exit status 2 and no traceback."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def process_error(*args: str, env: dict | None = None) -> str:
    """The same through a real `python cli.py` process: stderr is one line."""
    r = run_cli(*args, env=env)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture()
def single(ckpt_root, tmp_path) -> Path:
    """A writable copy of a single-file fp32 checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(make_variant(ckpt_root, "topk"), dst)
    assert (dst / "model.safetensors").is_file() and not (dst / "model.safetensors.index.json").exists()
    return dst


def split(path: Path) -> tuple[dict, bytes]:
    """(header dict, data area) of a safetensors file, parsed here with struct + json."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write(path: Path, header: bytes | dict, data: bytes, claimed: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if claimed is None else claimed) + text + data)


def tensors(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


# ---- 4. the safetensors header, validated the way the format requires --------------------------------------
def test_header_length_off_by_one_refused(single):
    """A header padded with spaces still parses when its length is claimed one short; the data area then starts
    one byte early and every value is garbage (NaN logits before the fix). The exact coverage rule refuses it."""
    st = single / "model.safetensors"
    header, data = split(st)
    text = json.dumps(header).encode() + b"  "  # trailing spaces, as the safetensors library pads
    write(st, text, data)
    CheckpointView(single)  # the exact length loads
    write(st, text, data, claimed=len(text) - 1)
    msg = cli_error("inspect", str(single))
    assert "model.safetensors" in msg and "not indexed" in msg
    msg = cli_error("logits", str(single), "--ids", "1,2", "--out", str(single.parent / "x.npy"))
    assert "model.safetensors" in msg and not (single.parent / "x.npy").exists()


def test_overlapping_ranges_refused(single):
    st = single / "model.safetensors"
    header, data = split(st)
    by_size: dict[tuple, list[str]] = {}
    for name in tensors(header):
        by_size.setdefault(tuple(header[name]["shape"]), []).append(name)
    a, b = next(v for v in by_size.values() if len(v) >= 2)[:2]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # same bytes for two tensors
    write(st, header, data)
    msg = cli_error("inspect", str(single))
    assert "model.safetensors" in msg and "overlaps" in msg and (f"'{a}'" in msg or f"'{b}'" in msg)


def test_duplicate_key_refused(single):
    st = single / "model.safetensors"
    header, data = split(st)
    name = tensors(header)[0]
    text = json.dumps(header)
    dup = json.dumps({name: header[name]})[1:-1]
    write(st, (text[:-1] + ", " + dup + "}").encode(), data)
    assert json.loads(text[:-1] + ", " + dup + "}") == header  # plain json.loads would silently accept it
    msg = cli_error("inspect", str(single))
    assert "model.safetensors" in msg and "duplicate key" in msg and name in msg


def test_trailing_unindexed_bytes_and_gaps_refused(single):
    st = single / "model.safetensors"
    header, data = split(st)
    write(st, header, data + b"\0" * 16)
    assert "16 byte(s) after the last tensor" in cli_error("inspect", str(single))
    # a gap: move the last tensor 4 bytes later and grow the file to match
    last = max(tensors(header), key=lambda k: header[k]["data_offsets"][0])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 4, end + 4]
    write(st, header, data[:begin] + b"\0" * 4 + data[begin:])
    msg = cli_error("inspect", str(single))
    assert f"'{last}'" in msg and "4 unindexed bytes" in msg


@pytest.mark.parametrize("field,value,needle", [
    ("data_offsets", [0.0, 64.0], "data_offsets"),
    ("data_offsets", [64, 0], "data_offsets"),
    ("data_offsets", [0], "data_offsets"),
    ("shape", ["4"], "shape[0]"),
    ("shape", [-1, 2], "shape[0]"),
    ("shape", [True], "shape[0]"),
    ("shape", [1 << 62, 1 << 62], "shape[0]"),
    ("shape", [1 << 40, 1 << 40, 1 << 40], "needs"),
    ("dtype", 7, "dtype"),
    ("dtype", "I64", "I64"),
])
def test_header_entry_types_refused(single, field, value, needle):
    st = single / "model.safetensors"
    header, data = split(st)
    name = tensors(header)[0]
    header[name][field] = value
    write(st, header, data)
    msg = cli_error("inspect", str(single))
    assert "model.safetensors" in msg and name in msg and needle in msg


@pytest.mark.parametrize("meta,needle", [({"format": 1}, "format"), (["pt"], "__metadata__"),
                                         ({"k": {"nested": "x"}}, "k")])
def test_metadata_must_map_str_to_str(single, meta, needle):
    st = single / "model.safetensors"
    header, data = split(st)
    header["__metadata__"] = meta
    write(st, header, data)
    msg = cli_error("inspect", str(single))
    assert "model.safetensors" in msg and "__metadata__" in msg and needle in msg


@pytest.mark.parametrize("text,claimed,needle", [
    (b"[1, 2]", None, "does not start with '{'"),
    (b" {}", None, "does not start with '{'"),
    (b"{\"a\": " * 5000 + b"1" + b"}" * 5000, None, "nested deeper"),
    (b"{}", 1 << 63, "corrupt safetensors header"),
    (b"{\"x\": NaN}", None, "NaN"),
])
def test_malformed_header_json_refused(single, text, claimed, needle):
    st = single / "model.safetensors"
    _, data = split(st)
    write(st, text, data, claimed=claimed)
    msg = cli_error("inspect", str(single))
    assert "model.safetensors" in msg and needle in msg


def test_weights_that_are_not_regular_files_refused(single):
    st = single / "model.safetensors"
    st.unlink()
    os.mkfifo(st)  # opening a FIFO for reading would block forever
    t0 = time.monotonic()
    msg = process_error("inspect", str(single))
    assert "model.safetensors" in msg and "not a regular file" in msg and time.monotonic() - t0 < 30


# ---- 5/6/7. config.json: typed, finite, bounded, checked against the headers --------------------------------
def _edit_config(root: Path, **changes) -> None:
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(changes)
    (root / "config.json").write_text(json.dumps(cfg))


def test_rope_factor_nan_refused(single):
    cfg = json.loads((single / "config.json").read_text())
    text = json.dumps({**cfg, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}).replace("2.0", "NaN")
    (single / "config.json").write_text(text)
    assert "NaN" in text
    msg = cli_error("logits", str(single), "--ids", "1,2", "--out", str(single.parent / "x.npy"))
    assert "config.json" in msg and "NaN" in msg and "field 'rope_scaling.factor'" in msg
    assert not (single.parent / "x.npy").exists()
    # 1e999 is how JSON spells an overflow to infinity: parsed, then refused by the schema
    (single / "config.json").write_text(text.replace("NaN", "1e999"))
    msg = process_error("inspect", str(single))
    assert "config.json" in msg and "rope_scaling.factor" in msg and "finite" in msg


@pytest.mark.parametrize("changes,needle", [
    ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    ({"hidden_size": 64.0}, "hidden_size"),
    ({"vocab_size": -5}, "vocab_size"),
    ({"vocab_size": 1 << 60}, "vocab_size"),
    ({"attention_bias": "false"}, "attention_bias"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"num_experts_per_layer": [8, "8"]}, "num_experts_per_layer[1]"),
    ({"always_active_experts": [0.5]}, "always_active_experts[0]"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "1",
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, "rope_scaling.low_freq_factor"),
    ({"rope_scaling": [2.0]}, "rope_scaling"),
    ({"num_hidden_layers": 10 ** 8}, "num_hidden_layers"),
])
def test_config_fields_typed_and_bounded(single, changes, needle):
    _edit_config(single, **changes)
    msg = cli_error("inspect", str(single))
    assert "config.json" in msg and f"field '{needle}'" in msg


def test_absurd_expert_count_checked_against_headers_first(single):
    """10^7 experts per layer fit the schema's bound; the reader compares the implied tensor count with the
    headers before it builds the expected-tensor table (3 * 10^7 entries per layer)."""
    _edit_config(single, num_experts=10 ** 7)
    t0 = time.monotonic()
    msg = cli_error("inspect", str(single))
    assert time.monotonic() - t0 < 5
    assert "config.json" in msg and "describes at least" in msg and str(2 + 2 * (6 + 3 * 10 ** 7)) in msg


def test_deeply_nested_config_and_index_refused(single, ckpt_root, tmp_path):
    nested = "[" * 100_000 + "]" * 100_000
    text = (single / "config.json").read_text().rstrip()
    (single / "config.json").write_text(text[:-1] + ', "extra": ' + nested + "}")
    assert "nested deeper" in cli_error("inspect", str(single))
    sharded = tmp_path / "sharded"
    shutil.copytree(make_variant(ckpt_root, "topk", dtype="bf16", shard_size=40_000), sharded)
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ' + nested + "}")
    msg = cli_error("inspect", str(sharded))
    assert "model.safetensors.index.json" in msg and "nested deeper" in msg


def test_index_schema(ckpt_root, tmp_path):
    root = tmp_path / "sharded"
    shutil.copytree(make_variant(ckpt_root, "topk", dtype="bf16", shard_size=40_000), root)
    index = root / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    name = next(iter(good["weight_map"]))
    for bad, needle in [({"weight_map": {**good["weight_map"], name: 3}}, f"weight_map.{name}"),
                        ({"metadata": {}}, "weight_map"),
                        ({"weight_map": [1]}, "weight_map"),
                        # a name longer than the file system allows (ENAMETOOLONG from stat; found by the fuzzer)
                        ({"weight_map": {**good["weight_map"], name: "x" * 300}}, name)]:
        index.write_text(json.dumps(bad))
        msg = cli_error("inspect", str(root))
        assert "model.safetensors.index.json" in msg and needle in msg, msg


def test_context_bounded():
    from emo_edge.plan.search import make_plan
    from emo_edge.model.synth import PRESETS, build_config

    spec = spec_from_config(build_config(PRESETS["tiny"]))
    assert check_context(spec, MAX_CONTEXT) == MAX_CONTEXT
    with pytest.raises(ConfigError, match=f"above the limit of {MAX_CONTEXT}"):
        make_plan(spec, None, None, 10 ** 12)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ConfigError, match="positive integer"):
            check_context(spec, bad)


def test_export_context_absurd_refused_before_work(tmp_path):
    out = tmp_path / "bundle"
    msg = process_error("export", "--model", "emo_edge/models/emo-tiny", "--pools", "math", "--context",
                        str(10 ** 12), "--out", str(out))
    assert "context 1000000000000" in msg and str(MAX_CONTEXT) in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---- 3. symlinks out of the checkpoint directory -------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"])
def test_symlink_leaving_directory_refused(single, tmp_path, name):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(single / name, outside / name)
    (single / name).symlink_to(outside / name)
    msg = process_error("inspect", str(single))
    assert name in msg and "outside" in msg


def test_symlink_inside_directory_still_loads(single):
    (single / "weights").mkdir()
    shutil.move(single / "model.safetensors", single / "weights" / "real.safetensors")
    (single / "model.safetensors").symlink_to("weights/real.safetensors")
    assert CheckpointView(single).tensors


# ---- 11. the Hugging Face hub cache layout -------------------------------------------------------------------
def hub_layout(src: Path, cache: Path, repo: str = "allenai/Emo_1b14b_1T", rev: str = "0" * 40) -> Path:
    """Lay `src` out as huggingface_hub does: blobs named by their content's sha256, and a snapshot directory of
    relative symlinks into ../../blobs/."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "blobs").mkdir(parents=True)
    snap = entry / "snapshots" / rev
    snap.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(rev)
    for f in sorted(src.iterdir()):
        if f.is_file():
            blob = hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, entry / "blobs" / blob)
            (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return snap


def test_hub_cache_sharded_checkpoint_is_the_default(ckpt_root, tmp_path, monkeypatch):
    src = make_variant(ckpt_root, "shared1", dtype="bf16", shard_size=40_000)
    assert len(list(src.glob("model-*.safetensors"))) > 1
    snap = hub_layout(src, tmp_path / "hub")
    assert all(p.is_symlink() for p in snap.iterdir())
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "EMO_EDGE_MODEL": ""}
    r = run_cli("inspect", env=env)  # no model named: the hub cache snapshot is the default
    assert r.returncode == 0, r.stderr
    direct = CliRunner().invoke(cli, ["inspect", str(src)])
    assert r.stdout.splitlines()[0] == f"checkpoint   {snap}"
    assert r.stdout.splitlines()[1:] == direct.output.splitlines()[1:]  # same identity, shape and bytes
    hub, ref = CheckpointView(snap), CheckpointView(src)
    assert hub.identity == ref.identity
    for name in ref.tensors:
        assert torch.equal(hub.tensor(name), ref.tensor(name)), name
    assert hub.tokenizer_path() == snap / "tokenizer.json"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("EMO_EDGE_MODEL", raising=False)
    a = CliRunner().invoke(cli, ["logits", "--text", "a b", "--out", str(tmp_path / "a.npy")])
    b = CliRunner().invoke(cli, ["logits", str(src), "--text", "a b", "--out", str(tmp_path / "b.npy")])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_hub_cache_snapshot_follows_refs_main(ckpt_root, tmp_path, monkeypatch):
    from emo_edge.model.locate import hf_cache_snapshot

    snap = hub_layout(make_variant(ckpt_root, "topk"), tmp_path / "hub")
    newer = snap.parent / ("f" * 40)
    newer.mkdir()
    for link in snap.iterdir():
        (newer / link.name).symlink_to(os.readlink(link))
    os.utime(newer, (time.time() + 60, time.time() + 60))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hf_cache_snapshot() == snap  # refs/main names it
    (snap.parent.parent / "refs" / "main").write_text("../../elsewhere")
    assert hf_cache_snapshot() == newer  # an unusable ref: the newest snapshot


def test_hub_cache_link_leaving_its_entry_refused(ckpt_root, tmp_path):
    src = make_variant(ckpt_root, "shared1", dtype="bf16", shard_size=40_000)
    snap = hub_layout(src, tmp_path / "hub")
    other = hub_layout(src, tmp_path / "hub", repo="someone/else")
    shard = sorted(snap.glob("model-*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to(os.path.relpath(os.path.realpath(other / shard.name), snap))  # into another cache entry
    msg = cli_error("inspect", str(snap))
    assert shard.name in msg and "outside" in msg


# ---- calibration documents, pool files, catalog entries, targets ---------------------------------------------
def test_calibration_reads_are_bounded(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(PoolError, match=f"larger than {MAX_FILE_BYTES >> 20} MiB"):
        read_documents("/dev/zero")
    assert time.monotonic() - t0 < 20
    big = tmp_path / "big.txt"
    big.write_text("x" * (MAX_DOCUMENT_CHARS + 1))
    with pytest.raises(PoolError, match=f"document 1 has {MAX_DOCUMENT_CHARS + 1} characters"):
        read_documents(big)
    line = tmp_path / "big.jsonl"
    line.write_text(json.dumps({"text": "y" * (MAX_DOCUMENT_CHARS + 1)}) + "\n")
    with pytest.raises(PoolError, match="big.jsonl:1: field 'text'"):
        read_documents(line)
    ok = tmp_path / "ok.txt"
    ok.write_text("x" * MAX_DOCUMENT_CHARS + "\n\nsecond")
    assert [len(d) for d in read_documents(ok)[0]] == [MAX_DOCUMENT_CHARS, 6]


@pytest.mark.parametrize("line,needle", [
    ('{"text": 5}', ":2: field 'text'"),
    ('{"text": "a", "n": NaN}', ":2: not valid JSON"),
    ('["text"]', ":2: expected a JSON object"),
    ('{"t": ' + "[" * 5000 + "]" * 5000 + "}", ":2: JSON nested deeper"),
    ('{"other": "x"}', ":2: field 'text'"),
])
def test_calibration_jsonl_lines_validated(tmp_path, line, needle):
    f = tmp_path / "calib.jsonl"
    f.write_text('{"text": "fine document"}\n' + line + "\n")
    with pytest.raises(PoolError) as err:
        read_documents(f)
    assert str(err.value).startswith(str(f)) and needle in str(err.value) and "\n" not in str(err.value)


def test_calibration_dev_zero_through_cli(tmp_path):
    msg = process_error("pools", "discover", "--model", "emo_edge/models/emo-tiny", "--name", "z", "--calib",
                        "/dev/zero", "--catalog", str(tmp_path / "cat"))
    assert "/dev/zero" in msg and "64 MiB" in msg


@pytest.mark.parametrize("pool,needle", [
    ({"layers": [["1"], None]}, "layers[0][0]"),
    ({"layers": [[1.0], None]}, "layers[0][0]"),
    ({"layers": [[-1], None]}, "layers[0][0]"),
    ({"layers": "all"}, "layers"),
])
def test_pool_file_schema(single, tmp_path, pool, needle):
    f = tmp_path / "pool.json"
    f.write_text(json.dumps(pool))
    msg = cli_error("logits", str(single), "--ids", "1,2", "--pool", str(f), "--out", str(tmp_path / "x.npy"))
    assert "pool.json" in msg and needle in msg


def test_catalog_entry_schema(tmp_path):
    from emo_edge.pools import Catalog

    view = CheckpointView("emo_edge/models/emo-tiny")
    entry = json.loads((view.root / "emo_edge_pools" / "math.json").read_text())
    cat = tmp_path / "cat"
    cat.mkdir()
    for change, needle in [({"stats": ["x"] * 4}, "stats[0]"),
                           ({"calibration": {"files": [{"name": "a", "sha256": "nothex"}]}}, "calibration.files[0]"),
                           ({"stats": [{**entry["stats"][0], "coverage": 12345.5}] + entry["stats"][1:]}, "coverage"),
                           ({"name": "../x"}, "name"),
                           ({"checkpoint": [1]}, "another checkpoint")]:
        # 12345.5 stands for 1e999, which JSON parses as infinity
        (cat / "bad.json").write_text(json.dumps({**entry, **change}).replace("12345.5", "1e999"))
        with pytest.raises(PoolError) as err:
            Catalog(view, cat).get("bad")
        assert "bad.json" in str(err.value) and needle in str(err.value), str(err.value)
    (cat / "good.json").write_text(json.dumps({**entry, "name": "good"}))
    assert Catalog(view, cat).get("good").layers == entry["layers"]


def test_shipped_catalog_symlink_leaving_checkpoint_refused(single, tmp_path):
    entry = Path("emo_edge/models/emo-tiny/emo_edge_pools/math.json").resolve()
    (single / "emo_edge_pools").mkdir()
    (single / "emo_edge_pools" / "math.json").symlink_to(entry)
    from emo_edge.pools import Catalog

    with pytest.raises(PoolError, match="outside"):
        Catalog(CheckpointView(single), tmp_path / "cat").get("math")


def test_target_schema(tmp_path):
    from targets import _DIR, load_target

    good = json.loads((_DIR / "cpu.json").read_text())
    assert load_target(_DIR / "cpu.json").block_size == good["block_size"]
    for change, needle in [({"block_size": "32"}, "block_size"),
                           ({"verify": {"fp32": {"kl": -1.0}}}, "verify.fp32.kl"),
                           ({"precisions": {**good["precisions"], "experts": ["int3"]}}, "precisions.experts[0]"),
                           ({"kv_cache_dtype": "bfloat16"}, "kv_cache_dtype"),
                           ({"overhead": {**good["overhead"], "weight_fraction": 12345.5}}, "weight_fraction")]:
        f = tmp_path / "cpu.json"
        f.write_text(json.dumps({**good, **change}).replace("12345.5", "1e999"))  # 1e999 parses as infinity
        with pytest.raises(EmoEdgeError) as err:
            load_target(f)
        assert str(f) in str(err.value) and needle in str(err.value), str(err.value)
