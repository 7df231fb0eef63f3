"""CheckpointView: an EMO checkpoint directory, validated up front and read lazily.

Nothing here reads the whole model. Opening a checkpoint parses `config.json`, the shard index and each
shard's safetensors header (a few KB each), and checks every tensor's presence, dtype and shape against the
spec. Tensor data is read on demand from memory maps; `tensor()` copies one tensor (or some rows of it) out and
then tells the kernel it may drop the mapped pages, so streaming through a 27 GB checkpoint keeps RSS near one
layer.

Never: import `modeling_emo.py`, unpickle (`*.bin`), or follow an index entry outside the directory.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .names import TensorKey, expected_tensors
from .spec import EmoSpec, load_spec

# safetensors dtype -> (numpy storage dtype, bytes per element). bf16 is kept as raw uint16 until converted.
DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # shard file name, relative to the checkpoint directory
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], bytes]:
    """Parse one safetensors file's header; check that every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header (says {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {dtype}; supported: {', '.join(DTYPES)}")
        expect = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1]
        if end - begin != expect or begin < 0:
            raise CheckpointError(f"{path}: tensor '{name}' spans {end - begin} bytes but {dtype}{list(shape)} needs {expect}")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor '{name}' ends at byte {base + end} but the file has {size}")
        out[name] = TensorInfo(name, path.name, dtype, shape, base + begin, expect)
    return out, raw


def _shard_files(root: Path) -> dict[str, str] | None:
    """The index's weight map (tensor -> shard file), validated; None for a single-file checkpoint."""
    index = root / INDEX_FILE
    if not index.is_file():
        if (root / SINGLE_FILE).is_file():
            return None
        if any(root.glob("*.bin")):
            raise CheckpointError(f"{root}: only pickle (*.bin) weights found; emo-edge reads safetensors only and never unpickles")
        raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index}: not a valid shard index (needs a 'weight_map' object)") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must be an object")
    resolved_root = root.resolve()
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts \
                or (root / file).resolve().parent != resolved_root:
            raise CheckpointError(f"{index}: entry '{name}' points outside the checkpoint directory: {file!r}")
        if not (root / file).is_file():
            raise CheckpointError(f"{index}: shard '{file}' (holding '{name}') is missing")
    return weight_map


class CheckpointView:
    """A validated, lazily read EMO checkpoint."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: not a directory")
        self.spec: EmoSpec = load_spec(self.root)
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
        config_bytes = (self.root / "config.json").read_bytes()
        self.identity = hashlib.sha256(hashlib.sha256(config_bytes).digest() + header_digest.digest()).hexdigest()
        self._maps: dict[str, mmap.mmap] = {}

    # ---- validation ---------------------------------------------------------------------------------
    def _check_tensors(self) -> None:
        expected = expected_tensors(self.spec)
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
            with open(self.root / file, "rb") as f:
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
        path = self.root / "tokenizer.json"
        return path if path.is_file() else None


def _where(key: TensorKey) -> str:
    parts = []
    if key.layer is not None:
        parts.append(f"layer {key.layer}")
    if key.expert is not None:
        parts.append(f"expert {key.expert}")
    return f" for {', '.join(parts)}" if parts else ""
