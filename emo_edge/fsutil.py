"""Outputs appear atomically: written to a temporary sibling, then renamed into place."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import EmoEdgeError


def read_json(path: str | Path, error: type[EmoEdgeError] = EmoEdgeError, missing: str = "not found"):
    """Parse a JSON file; any failure is `error` with a one-line message naming the file."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise EmoEdgeError(f"{path}: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EmoEdgeError(f"{path}: cannot write ({exc.strerror})") from None
    return path


@contextmanager
def atomic_dir(path: str | Path, force: bool = False):
    """Yields a temporary directory; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    if path.exists() and not force:
        raise EmoEdgeError(f"{path}: already exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
