"""Hostile-input primitives shared by every loader: bounded JSON parsing, typed schema validation, and path
containment.

Every JSON a loader reads (config.json, the shard index, manifest.json, genai_config.json, pool files, catalog
entries, prepared.json, calibration JSONL) goes through `load_json` / `parse_json` and then `validate` against a
pydantic model, so a wrong type, a missing key, a negative or absurd number or a NaN is one line naming the file
and the field, never a traceback deep inside the code that uses it. pydantic (v2, Rust core) is used because it
is the most widely kept schema library for Python, reports the exact location of each failure, and validates
strictly (no silent "1" -> 1 coercion) when asked to.

Every path a bundle or checkpoint file names goes through `confined`: a plain relative name, resolved inside the
root (symlinks resolved and re-checked).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import EmoEdgeError

MAX_JSON_BYTES = 64 << 20  # no JSON we read is near this; a manifest of a 14B swappable bundle is ~2 MB
MAX_DEPTH = 64  # deeper nesting than any file we read; refused before Python's recursion limit is reached
MAX_COUNT = 1 << 40  # an upper bound for sizes, offsets and counts: absurd values are refused, not allocated

# Strict, bounded scalar types for schemas.
Int = Annotated[int, Field(strict=True, ge=-MAX_COUNT, le=MAX_COUNT)]
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]  # sizes, offsets, ids
Positive = Annotated[int, Field(strict=True, ge=1, le=MAX_COUNT)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Str = Annotated[str, Field(strict=True, max_length=1 << 16)]
Sha256 = Annotated[str, Field(strict=True, pattern=r"^[0-9a-f]{64}$")]

M = TypeVar("M")


class Schema(BaseModel):
    """Base for file schemas: unknown keys are kept (forward compatibility), known ones are typed strictly."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _depth(obj: Any) -> int:
    """Maximum nesting depth, iteratively (no recursion on hostile input)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def _unique_object(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


class _Constant:
    pass


def _constant_field(text: str) -> str:
    """", at field '<a.b[2]>'" naming where the first NaN/Infinity is, or "" (parsed again only on that error)."""
    try:
        data = json.loads(text, parse_constant=lambda _: _Constant())
    except (ValueError, RecursionError):
        return ""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        o, loc = stack.pop()
        if isinstance(o, _Constant):
            return f", at field '{_loc(loc)}'"
        if isinstance(o, dict):
            stack.extend((v, loc + (k,)) for k, v in reversed(o.items()))
        elif isinstance(o, list) and len(loc) < MAX_DEPTH:
            stack.extend((v, loc + (i,)) for i, v in reversed(list(enumerate(o))))
    return ""


def parse_json(text: str | bytes, where: str, error: type[EmoEdgeError] = EmoEdgeError,
               unique_keys: bool = False) -> Any:
    """Parse JSON text strictly: no NaN/Infinity, nesting at most MAX_DEPTH (and, with `unique_keys`, no key
    twice in one object); any failure is `error` naming `where`."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant,
                          object_pairs_hook=_unique_object if unique_keys else None)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # NaN / Infinity, or an integer too long to convert
        raise error(f"{where}: not valid JSON ({exc}{_constant_field(text)})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested deeper than {MAX_DEPTH} levels") from None
    if _depth(data) > MAX_DEPTH:
        raise error(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    return data


def open_regular(path: str | Path, error: type[EmoEdgeError] = EmoEdgeError, missing: str = "not found",
                 regular: bool = True):
    """`path` opened for binary reading without blocking on what it is: the open is non-blocking, so a FIFO with
    no writer cannot hang it, and anything but a regular file is refused (`regular=False` lets pipes and FIFOs
    through, read in blocking mode: `--calib <(...)`). Every reader of a file a user or a bundle names opens it
    here."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise error(f"{path}: is a directory, expected a file")
        if not stat.S_ISREG(mode) and (regular or not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode))):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
            raise error(f"{path}: {kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | Path, error: type[EmoEdgeError] = EmoEdgeError, missing: str = "not found",
                 max_bytes: int = MAX_JSON_BYTES, regular: bool = True, limit_note: str = "") -> bytes:
    """At most `max_bytes` of `path`, refusing more (so /dev/zero or a huge file is one line, not a MemoryError);
    `regular`: refuse anything but a regular file (pipes such as `--calib <(...)` need regular=False)."""
    path = Path(path)
    with open_regular(path, error, missing, regular) as f:
        try:
            raw = f.read(max_bytes + 1)
        except OSError as exc:
            raise error(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > max_bytes:
        raise error(f"{path}: larger than {max_bytes >> 20} MiB{limit_note or '; not a file emo-edge writes or reads'}")
    return raw


def load_json(path: str | Path, error: type[EmoEdgeError] = EmoEdgeError, missing: str = "not found",
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read and parse a JSON file of at most `max_bytes`; any failure is `error` with one line naming the file."""
    return parse_json(read_bounded(path, error, missing, max_bytes), str(path), error)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def validate(data: Any, schema: type[M] | Any, where: str, error: type[EmoEdgeError] = EmoEdgeError) -> M:
    """`data` checked against `schema` (a pydantic model or any type TypeAdapter accepts); the first failure
    is `error`: "<where>: field <a.b[2]>: <what is wrong> (got <value>)"."""
    if _depth(data) > MAX_DEPTH:
        raise error(f"{where}: nested deeper than {MAX_DEPTH} levels")
    try:
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return schema.model_validate(data)
        return TypeAdapter(schema).validate_python(data, strict=True)
    except ValidationError as exc:
        e = exc.errors(include_url=False)[0]
        got = repr(e.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        raise error(f"{where}: field '{_loc(tuple(e['loc']))}': {e['msg'].lower()} (got {got})") from None


def confined(root: str | Path, name: Any, where: str, error: type[EmoEdgeError] = EmoEdgeError,
             allowed_root: str | Path | None = None) -> Path:
    """The path `name` names inside `root`, refused unless it is a plain relative name that stays inside `root`
    after every symlink is resolved (or inside `allowed_root` when given: e.g. a Hugging Face cache entry whose
    snapshot files link into its blobs)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{where}: path {name!r} is not a file name")
    p = Path(name)
    if len(os.fsencode(name)) > 4095 or any(len(os.fsencode(part)) > 255 for part in p.parts):
        raise error(f"{where}: path {name[:40]!r}... is longer than a file system allows (255 bytes a name)")
    if p.is_absolute() or ".." in p.parts or name.startswith("~"):
        raise error(f"{where}: path {name!r} points outside {root}")
    root = Path(root)
    real_root = Path(os.path.realpath(allowed_root if allowed_root is not None else root))
    full = root / p
    real = Path(os.path.realpath(full))
    if real != real_root and real_root not in real.parents:
        raise error(f"{where}: path {name!r} resolves outside {root} (to {real})")
    return full


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
