"""Data safety (issue 10 items 1-3, issue 14 item 8): --force replaces only a bundle, '.'-like --out is refused,
the existence check holds at the rename, stale temporaries of killed processes are swept (only ours), and a full
disk is one line with nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from emo_edge import fsutil
from emo_edge.errors import EmoEdgeError

EXPORT = ("export", "--pools", "math", "--precision", "int4", "--no-verify")  # the fastest real export (~2 s)


def scratch_siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def one_error_line(proc, *needles: str) -> str:
    """The CLI failed the way users are promised: exit 2, one `error:` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def fake_bundle(path: Path, tag: str) -> Path:
    """A directory is_bundle accepts (what write_manifest writes at its top)."""
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"schema_version": 1, "emo_edge_version": "0", "files": {}}))
    (path / "tag").write_text(tag)
    return path


# ---------------------------------------------------------------------------------------------------------
# item 1 and 2: what --out and --force may name (through the CLI)
# ---------------------------------------------------------------------------------------------------------
def test_force_refuses_what_is_not_a_bundle(tmp_path):
    notes = tmp_path / "d"
    notes.mkdir()
    (notes / "notes.txt").write_text("important\n")
    a_file = tmp_path / "f.txt"
    a_file.write_text("mine\n")
    real = fake_bundle(tmp_path / "real", "keep")
    link = tmp_path / "link"
    link.symlink_to(real)
    for target, what in ((notes, "is a directory that is not an emo-edge bundle"), (a_file, "is a file"),
                         (link, "is a symlink")):
        proc = run_cli(*EXPORT, "--out", str(target), "--force")
        one_error_line(proc, str(target), what, "left untouched")
    assert (notes / "notes.txt").read_text() == "important\n" and sorted(os.listdir(notes)) == ["notes.txt"]
    assert a_file.read_text() == "mine\n"
    assert link.is_symlink() and (real / "tag").read_text() == "keep"
    proc = run_cli(*EXPORT, "--out", str(notes))  # without --force: says --force would not help either
    one_error_line(proc, "already exists", "--force would not replace it")
    assert scratch_siblings(tmp_path) == []


def test_out_naming_cwd_parent_or_root_is_refused(tmp_path, monkeypatch):
    for out in (".", "..", "/", ""):
        proc = run_cli(*EXPORT, "--out", out, "--force")
        one_error_line(proc, "current directory, a parent of it or the root")
    here = tmp_path / "sub"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (here / ".." / "sub", tmp_path, Path("sub/.."), Path("/")):  # the same check, other spellings
        with pytest.raises(EmoEdgeError, match="current directory, a parent of it or the root"):
            fsutil.check_target(out, True)
    assert fsutil.check_target(Path("new"), True) == Path("new")


# ---------------------------------------------------------------------------------------------------------
# item 3: the existence check holds at the rename (in-process, deterministic)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["renameat2", "fallback"])
def test_destination_created_during_the_write_is_never_replaced(tmp_path, monkeypatch, kernel):
    if kernel == "fallback":  # as on a kernel or file system without renameat2
        monkeypatch.setattr(fsutil, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "b"
    with pytest.raises(EmoEdgeError, match="already exists"):
        with fsutil.atomic_dir(out) as tmp:
            (tmp / "ours").write_text("x")
            fake_bundle(out, "theirs")  # another export finished first
    assert (out / "tag").read_text() == "theirs" and not (out / "ours").exists()
    assert scratch_siblings(tmp_path) == []
    if kernel == "renameat2":  # rename(2) would silently replace an empty directory; RENAME_NOREPLACE does not
        empty = tmp_path / "e"
        with pytest.raises(EmoEdgeError, match="already exists"):
            with fsutil.atomic_dir(empty) as tmp:
                (tmp / "ours").write_text("x")
                empty.mkdir()
        assert empty.is_dir() and os.listdir(empty) == []


@pytest.mark.parametrize("kernel", ["renameat2", "fallback"])
def test_force_swaps_a_bundle_and_puts_back_anything_else(tmp_path, monkeypatch, kernel):
    if kernel == "fallback":
        monkeypatch.setattr(fsutil, "_renameat2", lambda src, dst, flags: False)
    out = fake_bundle(tmp_path / "b", "old")
    with fsutil.atomic_dir(out, force=True) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"schema_version": 1, "emo_edge_version": "0"}))
        (tmp / "tag").write_text("new")
    assert (out / "tag").read_text() == "new" and scratch_siblings(tmp_path) == []
    # during the write, the bundle is replaced by the user's own directory: the check at the rename refuses it
    def users_dir():
        shutil.rmtree(out)
        out.mkdir()
        (out / "notes.txt").write_text("important")
    with pytest.raises(EmoEdgeError, match="not an emo-edge bundle.*left untouched"):
        with fsutil.atomic_dir(out, force=True) as tmp:
            (tmp / "tag").write_text("newer")
            users_dir()
    assert os.listdir(out) == ["notes.txt"] and scratch_siblings(tmp_path) == []
    # ... or in the instant between that check and the swap: what the swap displaced is checked and put back
    shutil.rmtree(out)
    fake_bundle(out, "old")
    exchange = fsutil._exchange
    def late_change(a, b, work):
        if not (out / "notes.txt").exists():
            users_dir()
        exchange(a, b, work)
    monkeypatch.setattr(fsutil, "_exchange", late_change)
    with pytest.raises(EmoEdgeError, match="changed while this was being written"):
        with fsutil.atomic_dir(out, force=True) as tmp:
            (tmp / "tag").write_text("newest")
    assert os.listdir(out) == ["notes.txt"] and scratch_siblings(tmp_path) == []


def test_two_exports_race_for_one_out(tmp_path):
    out = tmp_path / "b"
    cmd = [sys.executable, str(ROOT / "cli.py"), *EXPORT, "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "already exists" in loser and "Traceback" not in loser
    assert fsutil.is_bundle(out) and scratch_siblings(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# issue 14 item 8: stale temporaries
# ---------------------------------------------------------------------------------------------------------
def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def scratch(parent: Path, name: str, pid: int, marker: dict | None, files=("x",)) -> Path:
    d = parent / f".{name}.tmp-{pid}-abc123"
    d.mkdir()
    if marker is not None:
        (d / fsutil.MARKER).write_text(json.dumps(marker))
    for f in files:
        (d / f).write_text("data")
    return d


def test_sweep_removes_only_our_dead_temporaries(tmp_path):
    me, gone = fsutil._owner(), dead_pid()
    host = socket.gethostname()
    dead = scratch(tmp_path, "a", gone, dict(me, pid=gone, start="1"))
    reused = scratch(tmp_path, "b", os.getpid(), dict(me, start="1"))  # our pid, another process's start time
    rebooted = scratch(tmp_path, "c", os.getpid(), dict(me, boot="another-boot"))
    empty = scratch(tmp_path, "d", gone, None, files=())  # killed before its marker was written
    kept = [
        scratch(tmp_path, "live", os.getpid(), me),  # our own, running
        scratch(tmp_path, "user", gone, None),  # our name pattern, no marker: not ours
        scratch(tmp_path, "host", gone, dict(me, pid=gone, host=host + "-other")),  # another machine's
        scratch(tmp_path, "pidmix", gone, dict(me, pid=gone + 1)),  # marker pid differs from the name's
        scratch(tmp_path, "tool", gone, dict(me, pid=gone, tool="other")),
    ]
    (tmp_path / f".file.tmp-{gone}-abc123").write_text("a file, not a directory")
    removed = fsutil.sweep_stale(tmp_path)
    assert sorted(removed) == sorted([dead, reused, rebooted, empty])
    assert all(d.is_dir() and os.listdir(d) for d in kept)
    assert (tmp_path / f".file.tmp-{gone}-abc123").is_file()


def test_kill_9_leaves_a_temporary_that_the_next_export_sweeps(tmp_path):
    out = tmp_path / "b"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys; from emo_edge.fsutil import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'model.onnx.data').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), 9)\n"), str(out)], cwd=str(ROOT))
    assert killed.returncode == -signal.SIGKILL
    left = scratch_siblings(tmp_path)
    assert len(left) == 1 and left[0].startswith(".b.tmp-") and not out.exists()
    proc = run_cli(*EXPORT, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert scratch_siblings(tmp_path) == [] and fsutil.is_bundle(out)
    before = (out / "manifest.json").stat().st_ino
    (out / "stray").write_text("inside the bundle")
    proc = run_cli(*EXPORT, "--out", str(out), "--force")  # --force replaces a real bundle, whole
    assert proc.returncode == 0, proc.stderr
    assert fsutil.is_bundle(out) and not (out / "stray").exists()
    assert (out / "manifest.json").stat().st_ino != before and scratch_siblings(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# issue 14 item 8: a full disk, for real (a small tmpfs in a private mount namespace: nothing to clean up)
# ---------------------------------------------------------------------------------------------------------
def unshare_prefix() -> list[str] | None:
    """`unshare` with a private mount namespace (as root, or as a user through a user namespace)."""
    exe = shutil.which("unshare")
    if exe is None or sys.platform != "linux":
        return None
    for prefix in ([exe, "--mount"], [exe, "--user", "--map-root-user", "--mount"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


def run_on_small_disk(tmp_path: Path, size_kb: int, *cli: str):
    """Run `cli.py ...` with DIR a tmpfs of `size_kb` (DIR in the arguments is replaced by it); returns the
    process and what DIR held when it ended. Without mount namespaces: a file size limit instead (EFBIG)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    args = [a.replace("DIR", str(disk)) for a in cli]
    prefix = unshare_prefix()
    if prefix is None:
        code = (f"import resource, signal, runpy, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size_kb * 1024}, {size_kb * 1024})); "
                f"sys.argv = ['cli.py'] + sys.argv[1:]; runpy.run_path('cli.py', run_name='__main__')")
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=str(ROOT))
        return proc, sorted(os.listdir(disk)), "file too large"
    script = (f'mount -t tmpfs -o size={size_kb}k tmpfs "$1" || exit 99; shift; "$@"; rc=$?; '
              f'ls -A "{disk}" > "{tmp_path}/listing"; exit $rc')
    proc = subprocess.run([*prefix, "sh", "-c", script, "sh", str(disk), sys.executable, "cli.py", *args],
                          capture_output=True, text=True, cwd=str(ROOT))
    assert proc.returncode != 99, proc.stderr
    assert os.listdir(disk) == []  # the tmpfs went with the namespace
    return proc, (tmp_path / "listing").read_text().split(), "no space left on device"


def test_synth_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    proc, left, reason = run_on_small_disk(tmp_path, 160, "synth", "DIR/ck", "--preset", "tiny")
    one_error_line(proc, f"{tmp_path / 'disk' / 'ck'}:", reason, "nothing was left behind")
    assert left == []


def test_swappable_export_full_disk_in_its_second_stage(tmp_path):
    """3 MB holds the union's static bundle (~2.1 MB, stage 1) but not the swappable bundle next to it."""
    proc, left, reason = run_on_small_disk(tmp_path, 3072, "export", "--pools", "math,code", "--precision", "int4",
                                           "--no-verify", "--swappable", "--out", "DIR/sw")
    line = one_error_line(proc, reason)
    assert line.startswith(f"error: {tmp_path / 'disk' / 'sw'}:"), line  # the real --out, not the stage-1 one
    assert left == []


def test_every_force_user_replaces_only_its_own_kind(tmp_path):
    notes = tmp_path / "d"
    notes.mkdir()
    (notes / "notes.txt").write_text("important\n")
    proc = run_cli("synth", str(notes), "--preset", "tiny", "--force")  # synth: only a checkpoint
    one_error_line(proc, str(notes), "not an emo-edge checkpoint", "left untouched")
    assert os.listdir(notes) == ["notes.txt"]
    ck = tmp_path / "ck"
    assert run_cli("synth", str(ck), "--preset", "tiny", "--seed", "1").returncode == 0
    first = (ck / "model.safetensors").read_bytes()
    assert fsutil.is_checkpoint(ck) and not fsutil.is_bundle(ck)
    assert run_cli("synth", str(ck), "--preset", "tiny", "--seed", "2", "--force").returncode == 0
    assert (ck / "model.safetensors").read_bytes() != first and scratch_siblings(tmp_path) == []
    # the prepared store (runtime): a directory of what mapped.prepare() writes, nothing else
    from emo_edge.engine.swappable import mapped

    ours = fsutil.dir_of(mapped.STORE_FILES)  # what the runtime passes
    store = tmp_path / "store"
    store.mkdir()
    for name in ("prepared.json", "moe0.onnx", "moe0.data", "moe12.onnx", "moe12.data", ".moe3.src.onnx"):
        (store / name).write_text("x")
    assert ours(store)
    with fsutil.atomic_dir(store, force=True, replaces=ours, what="prepared store") as tmp:
        (tmp / "prepared.json").write_text("new")
    assert os.listdir(store) == ["prepared.json"]
    (store / "notes.txt").write_text("mine")
    with pytest.raises(EmoEdgeError, match="not an emo-edge prepared store.*left untouched"):
        with fsutil.atomic_dir(store, force=True, replaces=ours, what="prepared store"):
            pass
    assert sorted(os.listdir(store)) == ["notes.txt", "prepared.json"]


def test_atomic_write_replaces_a_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "pool.json"
    fsutil.atomic_write(path, "one")
    with pytest.raises(EmoEdgeError, match="already exists"):  # not ours to replace unless told
        fsutil.atomic_write(path, b"two")
    assert path.read_text() == "one"
    fsutil.atomic_write(path, b"two", force=True)
    assert path.read_text() == "two" and sorted(os.listdir(tmp_path)) == ["pool.json"]
    with pytest.raises(EmoEdgeError, match="is a directory"):
        fsutil.atomic_write(tmp_path, "x")
