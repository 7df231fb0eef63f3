"""Hostile inputs, round two (issue 23): a graph in a subdirectory whose external data nothing hashes, FIFOs in
place of files, and one line instead of a traceback for the inputs the campaign found."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import run_cli
from test_bundle_security import cli_refuses, copy, edit_manifest, world  # noqa: F401 - the module fixture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- 1. a graph in a subdirectory reads data resolved from its own directory --------------------------------
def test_graph_in_subdirectory_with_unlisted_data_refused(world, tmp_path):  # noqa: F811
    b = copy(world, "static", tmp_path)
    (b / "sub").mkdir()
    shutil.copyfile(b / "model.onnx", b / "sub" / "model.onnx")
    shutil.copyfile(b / "model.onnx.data", b / "sub" / "model.onnx.data")  # what onnxruntime would read
    g = json.loads((b / "genai_config.json").read_text())
    g["model"]["decoder"]["filename"] = "sub/model.onnx"
    (b / "genai_config.json").write_text(json.dumps(g))
    # the graph is listed and hashed; its data file, resolved from sub/, is not
    edit_manifest(b, lambda m: m["files"].update({"sub/model.onnx": dict(m["files"]["model.onnx"])}))
    line = cli_refuses("run", str(b), "--prompt", "12", "--max-new-tokens", "2")
    assert "sub/model.onnx.data" in line and "not listed" in line


# ---- 5. FIFOs where a file is expected: refused at once, never a hang ----------------------------------------
def _fifo_in_place(path) -> None:
    if path.exists():
        path.unlink()
    os.mkfifo(path)


def _refuses_quickly(*args: str) -> str:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *args], capture_output=True, text=True,
                       timeout=60)
    assert time.monotonic() - t0 < 60
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_fifo_manifest_refused(world, tmp_path):  # noqa: F811
    b = copy(world, "static", tmp_path)
    _fifo_in_place(b / "manifest.json")
    for args in (("run", str(b), "--prompt", "1"), ("logits", str(b), "--ids", "1,2", "--out",
                                                    str(tmp_path / "x.npy"))):
        err = _refuses_quickly(*args)
        assert "manifest.json" in err and "FIFO" in err


def test_fifo_pool_file_and_catalog_entry_refused(world, tmp_path):  # noqa: F811
    pool = tmp_path / "p.json"
    os.mkfifo(pool)
    err = _refuses_quickly("logits", str(world["dir"] / "ckpt"), "--ids", "1,2", "--pool", str(pool), "--out",
                           str(tmp_path / "x.npy"))
    assert "p.json" in err and "FIFO" in err
    from emo_edge.model.checkpoint import CheckpointView
    from emo_edge.pools.catalog import Catalog

    cat = tmp_path / "cat"
    c = Catalog(CheckpointView(world["dir"] / "ckpt"), cat)
    entry_dir = c.writable
    entry_dir.mkdir(parents=True, exist_ok=True)
    os.mkfifo(entry_dir / "evil.json")
    for args in (("pools", "list", "--model", str(world["dir"] / "ckpt"), "--catalog", str(cat)),
                 ("pools", "show", "evil", "--model", str(world["dir"] / "ckpt"), "--catalog", str(cat))):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *args], capture_output=True, text=True,
                           timeout=60)
        assert "Traceback" not in r.stderr, r.stderr
        if r.returncode == 0:  # list skips what it cannot read, and says so
            assert "evil" in r.stdout + r.stderr
        else:
            assert r.returncode == 2 and "FIFO" in r.stderr


def test_read_bounded_allows_a_pipe_when_asked(tmp_path):
    from emo_edge.errors import EmoEdgeError
    from emo_edge.schema import read_bounded

    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with pytest.raises(EmoEdgeError, match="FIFO"):
        read_bounded(fifo)
    # regular=False (calibration from `<(...)`): a FIFO without a writer reads as empty instead of blocking
    assert read_bounded(fifo, regular=False) == b""


# ---- 6. a hostile tokenizer.json (listed and hashed) --------------------------------------------------------
def _with_tokenizer(world, tmp_path, change):  # noqa: F811
    b = copy(world, "static", tmp_path)
    tok = json.loads((b / "tokenizer.json").read_text())
    change(tok)
    (b / "tokenizer.json").write_text(json.dumps(tok))
    edit_manifest(b, lambda m: None)  # re-hashed: only the tokenizer's own check stops it
    return b


def test_tokenizer_padding_refused(world, tmp_path):  # noqa: F811
    b = _with_tokenizer(world, tmp_path, lambda t: t.update(padding={
        "strategy": {"Fixed": 10 ** 9}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 1,
        "pad_type_id": 0, "pad_token": "<|pad|>"}))
    line = cli_refuses("run", str(b), "--prompt", "12", "--max-new-tokens", "2")
    assert "tokenizer.json" in line and "padding" in line


def test_tokenizer_backtracking_regex_refused(world, tmp_path):  # noqa: F811
    def evil(t):
        t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False},
            t["pre_tokenizer"]]}
    line = cli_refuses("run", str(_with_tokenizer(world, tmp_path, evil)), "--prompt", "12", "--max-new-tokens", "2")
    assert "tokenizer.json" in line and "backtrack" in line and "pre_tokenizer" in line


def test_tokenizer_panic_is_one_error(tmp_path):
    from emo_edge.errors import EmoEdgeError
    from emo_edge.model.locate import EMBEDDED
    from emo_edge.model.tokenizer import TextTokenizer

    class PanicLike(BaseException):  # what pyo3 raises for a Rust panic: not an Exception
        pass

    tok = TextTokenizer(EMBEDDED / "tokenizer.json")

    class Boom:
        def encode(self, *a, **k):
            raise PanicLike("regex backtrack limit")

        def decode(self, *a, **k):
            raise PanicLike("bad id")

    tok._tok = Boom()
    with pytest.raises(EmoEdgeError, match="failed to encode .regex backtrack limit"):
        tok.encode("x")
    with pytest.raises(EmoEdgeError, match="failed to decode"):
        tok.decode([1])


# ---- 8. one line instead of a traceback ----------------------------------------------------------------------
def test_bad_values_are_one_line(world, tmp_path):  # noqa: F811
    b = str(world["static"])
    assert "UTF-8" in cli_refuses("run", b, "--prompt", "ab\udcff", "--max-new-tokens", "2")
    assert "UTF-8" in cli_refuses("logits", b, "--text", "\udcfe", "--out", str(tmp_path / "a.npy"))
    assert "out of range" in cli_refuses("logits", b, "--ids", "99999999999999999999999", "--out",
                                         str(tmp_path / "a.npy"))
    assert "--budget" in cli_refuses("export", "--pools", "math", "--budget", "1e400GB", "--dry-run")
    m = copy(world, "static", tmp_path)
    edit_manifest(m, lambda d: d.update(pools=5))
    assert "'pools'" in cli_refuses("run", str(m), "--prompt", "12")
    e = copy(world, "swap", tmp_path)
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({"layers": [[0, 1, 2], [0, 1, 2]]}))
    r = run_cli("logits", str(e), "--ids", "1,2", "--pool", str(pool), "--out", str(tmp_path / "b.npy"))
    assert r.returncode in (0, 2) and "Traceback" not in r.stderr, r.stderr


def test_tiny_temperature_samples_the_argmax():
    import numpy as np

    from emo_edge.engine.sampler import sample

    logits = np.array([0.5, 3.0, 2.9, -1.0], np.float32)
    rng = np.random.default_rng(0)
    assert {sample(logits, 1e-320, 1.0, rng) for _ in range(20)} == {1}
    assert {sample(logits, 1e-320, 0.5, rng) for _ in range(20)} == {1}


# ---- 9. nothing silently ignored, nothing of the user's lost ---------------------------------------------------
def test_serve_refuses_budget_on_a_static_bundle(world):  # noqa: F811
    line = cli_refuses("serve", str(world["static"]), "--budget", "1GB", "--port", "0")
    assert "--budget" in line and "static" in line


def test_synth_force_spares_a_checkpoint_emo_edge_did_not_write(tmp_path):
    """A downloaded EMO checkpoint (config.json with model_type emo, no marker of ours) and the user's other
    files in it are never replaced, --force or not."""
    d = tmp_path / "theirs"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "emo"}))
    (d / "notes.txt").write_text("mine\n")
    line = cli_refuses("synth", str(d), "--preset", "tiny", "--force")
    assert "not an emo-edge checkpoint" in line
    assert sorted(os.listdir(d)) == ["config.json", "notes.txt"]
    ours = tmp_path / "ours"
    assert run_cli("synth", str(ours), "--preset", "tiny").returncode == 0
    assert run_cli("synth", str(ours), "--preset", "tiny", "--seed", "3", "--force").returncode == 0


def test_pool_name_with_a_newline_is_one_line(tmp_path):
    from emo_edge.model.locate import EMBEDDED

    line = cli_refuses("pools", "discover", str(EMBEDDED), "--name", "a\nb", "--calib",
                       os.path.join(ROOT, "emo_edge", "data", "calib", "math.jsonl"), "--catalog", str(tmp_path))
    assert "'a\\nb'" in line


def test_discover_on_a_full_disk_leaves_no_catalog_directory(tmp_path):
    from test_data_safety import one_error_line, run_on_small_disk

    from emo_edge.model.locate import EMBEDDED

    proc, left, reason = run_on_small_disk(
        tmp_path, 4, "pools", "discover", str(EMBEDDED), "--name", "t", "--fraction", "0.25", "--calib",
        os.path.join(ROOT, "emo_edge", "data", "calib", "math.jsonl"), "--catalog", "DIR/cat/sub")
    line = one_error_line(proc, reason)
    assert str(tmp_path / "disk" / "cat" / "sub") in line and ".tmp-" not in line, line
    assert left == []


# ---- 7. the prepared store changed in place while serving ----------------------------------------------------
def test_store_changed_under_the_active_pool_is_noticed(world, tmp_path, monkeypatch):  # noqa: F811
    """Bytes of a resident, active expert changed on disk (what onnxruntime computes from): the next request
    notices, reloads and verifies; the first time the store is prepared again and the answer is unchanged, the
    second time the swap back is refused; a changed answer is never served silently."""
    import numpy as np

    from emo_edge.engine.swappable import SwappableEngine
    from emo_edge.errors import BundleError
    from test_bundle_security import IDS, flip

    monkeypatch.setenv("EMO_EDGE_HOME", str(tmp_path / "home"))
    said = []
    rt = SwappableEngine(world["swap"], mechanism="mapped", progress=said.append)
    rt.use("digits")
    digits = rt.logits(IDS)

    def spoil_active():
        L = rt.layers[0]
        e = L.pos[rt.pools["digits"][L.layer][0]]
        assert e in L.mapped.resident
        (a, _), _ = L.mapped.ranges(e)
        flip(L.mapped.data_path, a + 3)

    spoil_active()
    said.clear()
    assert np.array_equal(rt.logits(IDS), digits)
    assert any("changed on disk" in s for s in said) and any("preparing again" in s for s in said), said
    spoil_active()
    with pytest.raises(BundleError, match="fails its sha256 check"):
        rt.logits(IDS)
    rt.close()
