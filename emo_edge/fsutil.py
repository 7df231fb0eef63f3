"""Outputs appear atomically, and nothing of the user's is replaced.

Every output is written inside a *scratch* directory, a marked temporary sibling of the target
(`.NAME.tmp-PID-XXXXXXXX/`, holding `.emo-edge-temp.json` written first: pid, process start time, boot id,
host), then renamed into place:

- a new target is installed with `renameat2(RENAME_NOREPLACE)`, so "already exists" holds at the rename itself:
  of two writers racing for one name exactly one wins (the check before the work is only there to fail early);
- `force=True` replaces only what the caller says is ours (`replaces`, e.g. `is_bundle`): a directory, never a
  file or a symlink, swapped in one step with `renameat2(RENAME_EXCHANGE)`; the displaced directory is checked
  again after the swap (it could have been replaced between the check and the swap) and swapped back if it is
  not ours;
- a scratch directory whose process is gone (kill -9, power loss) is swept the next time anything is written
  next to it: only entries with our name pattern *and* our marker, only when the marker's process no longer
  runs on this host (pid gone, or the pid reused by a process started at another time, or another boot).

Where the kernel or file system lacks renameat2 (ENOSYS/EINVAL), a plain rename is used: it still refuses a
non-empty existing directory (so a racing bundle is never replaced), but it would replace an *empty* directory
created in the instant between the check and the rename.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import EmoEdgeError

log = logging.getLogger(__name__)

MARKER = ".emo-edge-temp.json"  # written first in every scratch directory; what makes a stale one sweepable
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_NAME_MAX = 120  # the scratch name keeps this much of the target's name (file names are limited to 255 bytes)
_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
          errno.EFBIG: "file too large (file size limit reached)"}


def os_reason(exc: OSError) -> str:
    """A short reason for an OSError; out-of-space errors in plain words."""
    return _SPACE.get(exc.errno) or exc.strerror or str(exc)


# ---------------------------------------------------------------------------------------------------------
# what --force may replace
# ---------------------------------------------------------------------------------------------------------
def _marker_json(path: str | Path, name: str):
    """The JSON of `path/name` when `path` is a real directory and `name` a regular file in it (no symlinks),
    else None: what our outputs carry to say they are ours."""
    from .schema import load_json

    p = Path(path)
    f = p / name
    if p.is_symlink() or not p.is_dir() or f.is_symlink() or not f.is_file():
        return None
    try:
        return load_json(f)
    except EmoEdgeError:
        return None


def is_bundle(path: str | Path) -> bool:
    """A real directory holding our manifest.json (schema_version plus emo_edge_version or kind)."""
    from .bundle.files import MANIFEST

    data = _marker_json(path, MANIFEST)
    return (isinstance(data, dict) and type(data.get("schema_version")) is int
            and (isinstance(data.get("emo_edge_version"), str) or data.get("kind") in ("static", "swappable")))


CHECKPOINT_MARKER = "emo_edge_checkpoint.json"  # written beside config.json by every checkpoint emo-edge writes


def is_checkpoint(path: str | Path) -> bool:
    """A real directory holding an EMO config.json and our marker (what `synth` and `train` write): a checkpoint
    someone else made, a downloaded one included, is never ours to replace."""
    data = _marker_json(path, "config.json")
    mark = _marker_json(path, CHECKPOINT_MARKER)
    return (isinstance(data, dict) and data.get("model_type") == "emo" and isinstance(mark, dict)
            and mark.get("written_by") == "emo-edge")


def dir_of(pattern: str) -> Callable[[Path], bool]:
    """A predicate: a real directory whose entries are all regular files named by `pattern` (a full match)."""
    rx = re.compile(pattern)

    def test(path: Path) -> bool:
        p = Path(path)
        if p.is_symlink() or not p.is_dir():
            return False
        return all(e.is_file(follow_symlinks=False) and rx.fullmatch(e.name) for e in os.scandir(p))
    return test


def check_target(path: str | Path, force: bool, replaces: Callable[[Path], bool] = is_bundle,
                 what: str = "bundle") -> Path:
    """Fail early, in one line, unless `path` can be written: a real name (not '.', '..', '/', the current
    directory or one of its parents) that does not exist, or, with `force`, holds a `what` of ours."""
    path = Path(path)
    if path.name in ("", ".", "..") or _is_cwd_or_above(path):
        raise EmoEdgeError(f"'{path}': is the current directory, a parent of it or the root, not a name for a new "
                           f"{what}; give a new directory such as bundles/NAME")
    if not os.path.lexists(path):
        return path
    ours = replaces(path)
    if not force:
        hint = "use --force to replace it" if ours else f"it is not an emo-edge {what}, so --force would not replace it"
        raise EmoEdgeError(f"{path}: already exists ({hint})")
    if not ours:
        raise EmoEdgeError(f"{path}: {_describe(path, what)}; --force replaces only an emo-edge {what}, so it was "
                           f"left untouched")
    return path


def _is_cwd_or_above(path: Path) -> bool:
    try:
        target, cwd = path.resolve(), Path.cwd().resolve()
    except (OSError, RuntimeError):  # a symlink loop, a vanished cwd
        return False
    return target == cwd or target in cwd.parents


def _describe(path: Path, what: str) -> str:
    if path.is_symlink():
        return "is a symlink"
    if path.is_dir():
        return f"is a directory that is not an emo-edge {what}"
    return "is a file" if path.is_file() else "is not a directory"


# ---------------------------------------------------------------------------------------------------------
# scratch directories and their sweeping
# ---------------------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _owner() -> dict:
    pid = os.getpid()
    return {"tool": "emo-edge", "pid": pid, "start": _process_start(pid), "boot": _boot_id(),
            "host": socket.gethostname()}


def _alive(owner: dict) -> bool:
    """Whether the process that wrote this marker may still be running (when unsure: yes)."""
    if owner.get("host") != socket.gethostname():
        return True  # another machine's scratch (shared file system): not ours to judge
    boot = _boot_id()
    if boot and owner.get("boot") and owner["boot"] != boot:
        return False  # written before the last reboot
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    start = _process_start(owner["pid"])
    return start is None or owner.get("start") is None or start == owner["start"]  # else: pid reused


def _read_marker(entry: os.DirEntry, pid: int) -> dict | None:
    marker = os.path.join(entry.path, MARKER)
    try:
        if not os.path.isfile(marker) or os.path.islink(marker) or os.path.getsize(marker) > 4096:
            return None
        data = json.loads(Path(marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("tool") == "emo-edge" and data.get("pid") == pid
    return data if ok else None


def sweep_stale(parent: str | Path) -> list[Path]:
    """Remove the scratch directories in `parent` left by processes that are gone; returns what was removed.
    Best effort: anything unreadable, unmarked (unless empty) or possibly alive is left alone."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = _SCRATCH.match(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(m["pid"])
        owner = _read_marker(entry, pid)
        try:
            if owner is not None and not _alive(owner):
                shutil.rmtree(entry.path)
            elif owner is None and pid != os.getpid() and not _alive({"pid": pid, "host": socket.gethostname()}):
                os.rmdir(entry.path)  # killed before its marker was written: only ever removed when empty
            else:
                continue
        except OSError:
            continue
        log.info("removed stale temporary %s (its process %d is gone)", entry.path, pid)
        removed.append(Path(entry.path))
    return removed


@contextmanager
def scratch(path: str | Path, error: type[EmoEdgeError] = EmoEdgeError):
    """A marked temporary sibling of `path` (`.NAME.tmp-PID-XXXXXXXX/`; parents created), removed on exit
    whatever happens. Stale ones next to it are swept first. Out-of-space errors become one line naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path.parent)
        work = Path(tempfile.mkdtemp(prefix=f".{path.name[:_NAME_MAX]}.tmp-{os.getpid()}-", dir=path.parent))
    except OSError as exc:
        raise error(f"{path}: cannot write ({os_reason(exc)}, making a temporary directory next to it)") from None
    try:
        (work / MARKER).write_text(json.dumps(_owner()), encoding="utf-8")
        yield work
    except OSError as exc:
        if exc.errno in _SPACE:
            raise error(f"{path}: cannot write: {os_reason(exc)}; nothing was left behind") from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# the renames
# ---------------------------------------------------------------------------------------------------------
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) through libc (os has no wrapper). False where the kernel, libc or file system lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; FileExistsError if `dst` exists, decided atomically by the kernel."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    try:
        os.rename(src, dst)  # still refuses a non-empty directory (and a file, for a directory src)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from None
        raise


def _exchange(a: Path, b: Path, work: Path) -> None:
    """Swap two existing paths, atomically where renameat2 exists."""
    if _renameat2(a, b, _RENAME_EXCHANGE):
        return
    old = work / "swap"
    os.rename(b, old)
    try:
        os.rename(a, b)
    except OSError:
        os.rename(old, b)
        raise
    os.rename(old, a)


def _install(tmp: Path, path: Path, work: Path, force: bool, replaces: Callable[[Path], bool], what: str) -> None:
    """Move the finished `tmp` to `path` under the rules in the module docstring."""
    for _ in range(3):  # the target may appear or vanish between our look and the rename: look again
        if not (force and os.path.lexists(path)):
            try:
                rename_noreplace(tmp, path)
                return
            except FileExistsError:
                if not force:
                    raise EmoEdgeError(f"{path}: already exists (it appeared while this was being written; "
                                       f"use --force to replace it)") from None
                continue
        check_target(path, True, replaces, what)
        try:
            _exchange(tmp, path, work)
        except FileNotFoundError:
            continue
        if not replaces(tmp):  # what we displaced changed after the check: put it back, untouched
            _exchange(tmp, path, work)
            raise EmoEdgeError(f"{path}: changed while this was being written; left untouched")
        shutil.rmtree(tmp, ignore_errors=True)  # the old one, ours
        return
    raise EmoEdgeError(f"{path}: keeps changing while this is being written; giving up")


@contextmanager
def atomic_dir(path: str | Path, force: bool = False, replaces: Callable[[Path], bool] = is_bundle,
               what: str = "bundle", error: type[EmoEdgeError] = EmoEdgeError):
    """Yields an empty temporary directory; on success it becomes `path` (see the module docstring), on any error
    it is removed. Out-of-space errors become one line naming `path` (an `error`)."""
    path = check_target(path, force, replaces, what)
    with scratch(path, error) as work:
        tmp = work / "new"
        tmp.mkdir()
        yield tmp
        _install(tmp, path, work, force, replaces, what)


def atomic_write(path: str | Path, data: bytes | str, force: bool = False) -> Path:
    """Write one file atomically. An existing file is replaced only with `force` (callers pass it for files
    that are ours, or when the user said --force); without it the kernel decides at the link, so of two writers
    racing for one name exactly one wins. A directory or symlink of that name is never replaced."""
    path = Path(path)
    if not path.parent.is_dir():
        raise EmoEdgeError(f"{path}: directory {path.parent} does not exist")
    if path.is_symlink() or path.is_dir():
        raise EmoEdgeError(f"{path}: is a {'symlink' if path.is_symlink() else 'directory'}; not replaced")
    if path.exists() and not force:
        raise EmoEdgeError(f"{path}: already exists (use --force to replace it)")
    try:
        with scratch(path) as work:
            tmp = work / "new"
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            if force:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # fails if the name exists, atomically
                except FileExistsError:
                    raise EmoEdgeError(f"{path}: already exists (it appeared while this was being written; use "
                                       f"--force to replace it)") from None
    except OSError as exc:
        raise EmoEdgeError(f"{path}: cannot write ({os_reason(exc)})") from None
    return path
