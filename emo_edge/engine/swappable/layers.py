"""What the runtime holds per MoE layer, what a swap reports, and the store's internal signals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ...errors import BundleError, EmoEdgeError, PoolError

MANIFEST = "manifest.json"


@dataclass
class MoELayer:
    index: int  # MoE block index m
    layer: int
    meta: dict
    router: np.ndarray  # float32 [H, r_union], resident
    ids: list[int]  # union source ids (ascending)
    pos: dict[int, int]  # source id -> union position
    template: object  # onnx.ModelProto without weights
    fd: int
    active: tuple[int, ...] = ()
    arena: list = field(default_factory=list)  # per part: [n, ...] arrays (the active pool, ascending)
    router_T: np.ndarray | None = None
    ortvalues: list = field(default_factory=list)
    session: object = None
    mapped: object = None  # mapped.MappedLayer in the mapped mechanism
    pool_idx: np.ndarray | None = None  # mapped: union positions of the active pool (ascending)
    mask: np.ndarray | None = None  # mapped: 0 on the active pool, -inf elsewhere

    @property
    def rec_bytes(self) -> int:
        return self.meta["record_bytes"]


@dataclass
class SwapStats:
    pool: str
    seconds: float = 0.0
    read_s: float = 0.0
    build_s: float = 0.0
    bytes_read: int = 0
    experts_read: int = 0
    experts_reused: int = 0
    experts_from_cache: int = 0
    layers_rebuilt: int = 0
    noop: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _NoStore(Exception):
    """No prepared store can be written here: the runtime falls back to the rebuild mechanism."""


class _StaleStore(Exception):
    """The prepared store does not fit this bundle, onnxruntime or CPU, or is corrupted: prepare it again."""


class _CorruptStore(BundleError):
    """An expert of the prepared store failed its sha256 check while serving."""


class _StaleStoreError(EmoEdgeError):
    """A defect of prepared.json found by the shared validators (turned into _StaleStore)."""


def _bundle_pool_error(name: str, known: Sequence[str]) -> PoolError:
    return PoolError(f"pool '{name}' is not in this swappable bundle (pools: {', '.join(known)}; or 'auto', "
                     f"'doc', a pool JSON file)")
