"""Write checkpoints in exactly the upstream Hugging Face layout, one tensor in memory at a time.

Shards are planned from the tensor shapes up front, so each shard's safetensors header is written first and
tensor data is streamed after it: writing a 27 GB-shape checkpoint never holds more than one tensor. The
directory appears atomically (`fsutil.atomic_dir`): written to a marked temporary sibling, renamed into place;
`force` replaces only an existing checkpoint (a directory with an EMO config.json), never anything else.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import EmoEdgeError
from ..fsutil import atomic_dir, is_checkpoint, os_reason
from .checkpoint import INDEX_FILE, SINGLE_FILE

STORE = {"bf16": ("BF16", 2), "fp32": ("F32", 4), "fp16": ("F16", 2)}


def to_storage(x: np.ndarray, dtype: str, chunk: int = 1 << 22) -> bytes:
    """float32 array -> little-endian bytes in the checkpoint dtype (bf16 rounds to nearest even, as torch
    does). Converted in chunks so a large tensor needs only its output bytes on top of itself."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if dtype == "fp32":
        return x.tobytes()
    if dtype == "fp16":
        return x.astype(np.float16).tobytes()
    out = bytearray(x.size * 2)
    view = np.frombuffer(out, dtype=np.uint16)
    for start in range(0, x.size, chunk):
        u = x[start:start + chunk].view(np.uint32)
        rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        rounded[np.isnan(x[start:start + chunk])] = 0x7FC0
        view[start:start + chunk] = rounded
    return bytes(out)


def plan_shards(shapes: dict[str, tuple[int, ...]], dtype: str, shard_size: int | None) -> list[list[str]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow `shard_size` bytes."""
    item = STORE[dtype][1]
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * item
        if shard_size and shards[-1] and used + nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _header(names: list[str], shapes: dict[str, tuple[int, ...]], dtype: str) -> bytes:
    tag, item = STORE[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        n = int(np.prod(shapes[name], dtype=np.int64)) * item
        header[name] = {"dtype": tag, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    return struct.pack("<Q", len(raw)) + raw


def write_checkpoint(
    out: str | Path,
    config: dict,
    shapes: dict[str, tuple[int, ...]],
    produce: Callable[[str], np.ndarray] | None,
    *,
    dtype: str = "bf16",
    shard_size: int | None = None,
    extra_files: dict[str, bytes] | None = None,
    force: bool = False,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Path:
    """Write a checkpoint directory. `produce(name)` returns the float32 tensor for `name`, called once each,
    in `shapes` order; `produce=None` writes a sparse all-zero checkpoint (headers are real; for scale tests of
    code that must not read weights)."""
    if dtype not in STORE:
        raise EmoEdgeError(f"unknown dtype '{dtype}' (choose from {', '.join(STORE)})")
    out = Path(out)
    try:
        with atomic_dir(out, force, replaces=is_checkpoint, what="checkpoint") as tmp:
            _write_files(tmp, config, shapes, produce, dtype, shard_size, extra_files or {}, progress)
    except OSError as exc:
        raise EmoEdgeError(f"{out}: cannot write ({os_reason(exc)}); nothing was left behind") from None
    return out


def _write_files(tmp: Path, config: dict, shapes: dict[str, tuple[int, ...]], produce, dtype: str,
                 shard_size: int | None, extra_files: dict[str, bytes], progress) -> None:
    """The checkpoint's files, into the (empty) directory `tmp`, with the marker that says emo-edge wrote it."""
    from .. import __version__
    from ..fsutil import CHECKPOINT_MARKER

    (tmp / CHECKPOINT_MARKER).write_text(json.dumps({"written_by": "emo-edge", "emo_edge_version": __version__}) + "\n")
    shards = plan_shards(shapes, dtype, shard_size)
    files = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    order = [(file, name) for file, names in zip(files, shards) for name in names]
    it = progress(order) if progress else order
    handles: dict[str, object] = {}
    try:
        for file, name in it:
            f = handles.get(file)
            if f is None:
                for other in handles.values():
                    other.close()
                handles.clear()
                f = handles[file] = open(tmp / file, "wb")
                f.write(_header(shards[files.index(file)], shapes, dtype))
            if produce is None:  # header-only checkpoint: data left as a sparse hole of zeros
                f.seek(int(np.prod(shapes[name], dtype=np.int64)) * STORE[dtype][1], os.SEEK_CUR)
                f.truncate()
                continue
            arr = produce(name)
            if tuple(arr.shape) != tuple(shapes[name]):
                raise EmoEdgeError(f"tensor '{name}': produced shape {list(arr.shape)}, planned {list(shapes[name])}")
            f.write(to_storage(arr, dtype))
    finally:
        for f in handles.values():
            f.close()
    if len(shards) > 1:
        total = sum(int(np.prod(s, dtype=np.int64)) * STORE[dtype][1] for s in shapes.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: file for file, name in order}}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for fname, data in extra_files.items():
        (tmp / fname).write_bytes(data)
