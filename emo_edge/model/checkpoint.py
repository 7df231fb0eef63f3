"""CheckpointView: an EMO checkpoint directory, validated up front and read lazily.

Nothing here reads the whole model. Opening a checkpoint parses `config.json`, the shard index and each
shard's safetensors header (a few KB each), and checks every tensor's presence, dtype and shape against the
spec. Tensor data is read on demand from memory maps; `tensor()` copies one tensor (or some rows of it) out and
then tells the kernel it may drop the mapped pages, so streaming through a 27 GB checkpoint keeps RSS near one
layer.

Every input is treated as hostile: config.json and the shard index are validated against typed schemas
(`hfconfig.ConfigFile`, `_ShardIndex`); each safetensors header is validated as the format requires (exact
length, no duplicate key, typed entries, the data area tiled exactly); the tensor count the config implies is
checked against the headers before any per-tensor table is built; every file is a regular file that resolves,
symlinks followed, inside the directory (or, for a Hugging Face hub cache snapshot, inside its
`models--org--name` entry: see `models.checkpoint_file`).

Never: import `modeling_emo.py`, unpickle (`*.bin`), or open a file outside the checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from ..errors import CheckpointError, ConfigError
from .locate import checkpoint_file
from .names import TensorKey, expected_tensors
from ..schema import MAX_JSON_BYTES, Count, Schema, Str, load_json, parse_json, validate
from .spec import EmoSpec, spec_from_config

# safetensors dtype -> (numpy storage dtype, bytes per element). bf16 is kept as raw uint16 until converted.
DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the header's JSON
# files next to the weights that emo-edge reads or copies into a bundle when present
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # shard file name, relative to the checkpoint directory
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


class _HeaderEntry(Schema):
    """One tensor of a safetensors header: {"dtype": "BF16", "shape": [m, n], "data_offsets": [begin, end]}."""

    dtype: Str
    shape: Annotated[list[Count], Field(max_length=64)]
    data_offsets: Annotated[list[Count], Field(min_length=2, max_length=2)]


class _ShardIndex(Schema):
    """model.safetensors.index.json: {"metadata": {...}, "weight_map": {tensor name: shard file name}}."""

    weight_map: dict[Str, Str]


def _open_regular(path: Path):
    """`path` opened for reading, refused unless it is a regular file (a FIFO or device would block or never
    end); returns (file, size)."""
    from ..schema import open_regular

    f = open_regular(path, CheckpointError, "missing")
    return f, os.fstat(f.fileno()).st_size


def _read_header_bytes(path: Path) -> tuple[bytes, int]:
    """The header JSON bytes of a safetensors file and the file's size; the 8-byte length is checked against
    the format's bound and the file."""
    f, size = _open_regular(path)
    with f:
        try:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header (says {n} bytes, file has {size})")
            raw = f.read(n)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) != n:
        raise CheckpointError(f"{path}: truncated while reading its header")
    if raw[:1] != b"{":
        raise CheckpointError(f"{path}: safetensors header does not start with '{{' (a wrong header length?)")
    return raw, size


def _tensor_info(path: Path, name: str, e: _HeaderEntry, base: int) -> TensorInfo:
    if e.dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor '{name}' has dtype {e.dtype}; supported: {', '.join(DTYPES)}")
    begin, end = e.data_offsets
    expect = math.prod(e.shape) * DTYPES[e.dtype][1]  # Python ints: no overflow on absurd shapes
    if end < begin or end - begin != expect:
        raise CheckpointError(f"{path}: tensor '{name}' spans {end - begin} bytes (data_offsets {[begin, end]}) "
                              f"but {e.dtype}{list(e.shape)} needs {expect}")
    return TensorInfo(name, path.name, e.dtype, tuple(e.shape), base + begin, expect)


def _check_coverage(path: Path, infos: list[TensorInfo], base: int, size: int) -> None:
    """The format's rule: the tensors tile the data area exactly, in offset order, without gap or overlap."""
    at, prev = base, None
    for info in sorted(infos, key=lambda i: (i.start, i.nbytes)):
        if info.start != at:
            what = f"overlaps tensor '{prev.name}'" if info.start < at else \
                f"leaves {info.start - at} unindexed bytes before it"
            raise CheckpointError(f"{path}: tensor '{info.name}' starts at data offset {info.start - base}, "
                                  f"{what} (the data area must be covered exactly)")
        at, prev = info.start + info.nbytes, info
    if at != size:
        if at > size:
            raise CheckpointError(f"{path}: truncated: tensor '{prev.name}' ends at byte {at} but the file has {size}")
        raise CheckpointError(f"{path}: {size - at} byte(s) after the last tensor are not indexed by the header "
                              f"(the data area must be covered exactly; a wrong header length?)")


def read_header(path: Path) -> tuple[dict[str, TensorInfo], bytes]:
    """Parse and validate one safetensors file's header the way the format requires: an exact length, a JSON
    object with no duplicate key, typed entries, a str->str `__metadata__`, and tensors covering the data area
    exactly (contiguous, no overlap, nothing after the last one)."""
    raw, size = _read_header_bytes(path)
    header = parse_json(raw, f"{path}: safetensors header", CheckpointError, unique_keys=True)
    if "__metadata__" in header:  # header is an object: it starts with '{'
        validate(header.pop("__metadata__"), dict[Str, Str], f"{path}: safetensors __metadata__", CheckpointError)
    # one validation of every entry (errors name the tensor: "field '<tensor>.shape[0]'")
    entries = validate(header, dict[Str, _HeaderEntry], f"{path}: safetensors header", CheckpointError)
    base = 8 + len(raw)
    out = {name: _tensor_info(path, name, entry, base) for name, entry in entries.items()}
    _check_coverage(path, list(out.values()), base, size)
    return out, raw


def _shard_files(root: Path) -> dict[str, str] | None:
    """The index's weight map (tensor -> shard file), validated; None for a single-file checkpoint."""
    index = checkpoint_file(root, INDEX_FILE, CheckpointError)
    if not index.is_file():
        if checkpoint_file(root, SINGLE_FILE, CheckpointError).exists():
            return None  # read_header refuses it unless a regular file
        if any(root.glob("*.bin")):
            raise CheckpointError(f"{root}: only pickle (*.bin) weights found; emo-edge reads safetensors only and never unpickles")
        raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")
    data = load_json(index, CheckpointError)
    weight_map = validate(data, _ShardIndex, str(index), CheckpointError).weight_map
    holder = {file: name for name, file in weight_map.items()}  # each shard once, named by one of its tensors
    for file, name in holder.items():
        if not file or "/" in file or "\\" in file or file in (".", "..") or file.startswith("~"):
            raise CheckpointError(f"{index}: entry '{name}' points outside the checkpoint directory: {file!r}")
        try:
            path = checkpoint_file(root, file, CheckpointError)
        except CheckpointError:
            raise CheckpointError(f"{index}: entry '{name}' points outside the checkpoint directory: {file!r}") from None
        if not path.exists():
            raise CheckpointError(f"{index}: shard '{file}' (holding '{name}') is missing")
    return weight_map


def _read_config(root: Path) -> tuple[EmoSpec, bytes]:
    """The spec and the exact bytes of `config.json` (its sha256 is part of the checkpoint identity)."""
    path = checkpoint_file(root, "config.json", ConfigError)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (is this an EMO checkpoint directory?)")
    try:
        f, size = _open_regular(path)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    with f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB; not a config.json")
    return spec_from_config(parse_json(raw, str(path), ConfigError), where=str(path)), raw


class CheckpointView:
    """A validated, lazily read EMO checkpoint."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: not a directory")
        self.spec, config_bytes = _read_config(self.root)
        for name in SIDE_FILES:  # refused now if they lead outside; read or copied later by name
            checkpoint_file(self.root, name, CheckpointError)
        weight_map = _shard_files(self.root)
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self.tensors: dict[str, TensorInfo] = {}
        header_digest = hashlib.sha256()
        for file in files:
            infos, raw = read_header(self.root / file)
            header_digest.update(file.encode() + b"\0" + raw)
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointError(f"{self.root / file}: tensor '{name}' also appears in {self.tensors[name].file}")
                if weight_map is not None and weight_map.get(name) != file:
                    listed = weight_map.get(name)
                    where = f"the index lists it in '{listed}'" if listed else "the index does not list it"
                    raise CheckpointError(f"{self.root / file}: holds tensor '{name}' but {where}")
                self.tensors[name] = info
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self.tensors:
                    raise CheckpointError(f"{self.root / INDEX_FILE}: lists '{name}' in '{file}' but that shard does not hold it")
        self._check_tensors()
        self.identity = hashlib.sha256(hashlib.sha256(config_bytes).digest() + header_digest.digest()).hexdigest()
        self._maps: dict[str, mmap.mmap] = {}

    # ---- validation ---------------------------------------------------------------------------------
    def _check_tensors(self) -> None:
        # Bound the config's claims by what the headers hold before building the expected table: every layer
        # has at least 6 tensors and every expert 3, so a config of 10^8 layers or experts stops here.
        spec = self.spec
        at_least = 2 + sum(6 + 3 * layer.num_experts for layer in spec.layers)
        if at_least > len(self.tensors):
            experts = sum(layer.num_experts for layer in spec.layers)
            raise CheckpointError(f"{self.root / 'config.json'}: describes at least {at_least} tensors "
                                  f"({spec.num_layers} layers, {experts} experts in all) but the weight files hold "
                                  f"{len(self.tensors)}: the checkpoint does not match its config.json")
        expected = expected_tensors(spec)
        names = {key.hf_name: (key, shape) for key, shape in expected.items()}
        for name, (key, shape) in names.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.root}: tensor '{name}' is missing (config expects it{_where(key)})")
            if info.shape != shape:
                raise CheckpointError(f"{self.root / info.file}: tensor '{name}' has shape {list(info.shape)}, "
                                      f"expected {list(shape)} from config.json")
        unexpected = sorted(set(self.tensors) - set(names))
        if unexpected:
            more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise CheckpointError(f"{self.root}: unexpected tensor '{unexpected[0]}'{more}: the checkpoint does not "
                                  f"match its config.json")
        dtypes = {info.dtype for info in self.tensors.values()}
        self.dtype = "+".join(sorted(dtypes))

    # ---- reading ------------------------------------------------------------------------------------
    def info(self, key: TensorKey | str) -> TensorInfo:
        name = key.hf_name if isinstance(key, TensorKey) else key
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: no tensor '{name}'") from None

    def _map(self, file: str) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with _open_regular(self.root / file)[0] as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[file] = mm
        return mm

    def raw(self, key: TensorKey | str) -> np.ndarray:
        """A zero-copy view of the stored data (bf16 as uint16). Touching it maps pages in."""
        info = self.info(key)
        np_dtype = DTYPES[info.dtype][0]
        count = info.nbytes // DTYPES[info.dtype][1]
        arr = np.frombuffer(self._map(info.file), dtype=np_dtype, count=count, offset=info.start)
        return arr.reshape(info.shape)

    def tensor(self, key: TensorKey | str, rows=None):
        """A float32 torch tensor copied out of the checkpoint (optionally only `rows` of a 2-D tensor);
        the mapped pages are released afterwards."""
        import torch

        info = self.info(key)
        raw = self.raw(info.name)
        if rows is not None:
            raw = raw[np.asarray(rows, dtype=np.int64)]
        if info.dtype == "BF16":
            out = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float()
        else:
            out = torch.from_numpy(raw.astype(np.float32, copy=True))
        self.release(info)
        return out

    def release(self, info: TensorInfo) -> None:
        """Drop this tensor's mapped pages from our resident set (they stay in the page cache)."""
        mm = self._maps.get(info.file)
        if mm is None or not hasattr(mm, "madvise"):
            return
        page = mmap.PAGESIZE
        start = (info.start // page) * page
        end = min(len(mm), info.start + info.nbytes)
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a numpy view still references it; the GC will close it
                pass
        self._maps.clear()

    # ---- facts --------------------------------------------------------------------------------------
    def bytes_on_disk(self) -> int:
        files = {info.file for info in self.tensors.values()}
        return sum(os.path.getsize(self.root / f) for f in files)

    def tokenizer_path(self) -> Path | None:
        path = checkpoint_file(self.root, "tokenizer.json", CheckpointError)
        return path if path.is_file() else None


def _where(key: TensorKey) -> str:
    parts = []
    if key.layer is not None:
        parts.append(f"layer {key.layer}")
    if key.expert is not None:
        parts.append(f"expert {key.expert}")
    return f" for {', '.join(parts)}" if parts else ""
