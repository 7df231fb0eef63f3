"""`emo-edge logits BUNDLE ...`: the bundle's logits in the same format as on a checkpoint (device side, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import Bundle, pool_matches
from .errors import BundleError


def bundle_logits(path: Path, ids: list[int], pool_file: str | None, text: str | None) -> np.ndarray:
    from .runtime import is_swappable, swappable_logits

    if is_swappable(path):  # --pool: a catalog name or a pool file, made resident by the runtime
        return swappable_logits(path, pool_file, ids, text)
    b = Bundle(path)
    if pool_file:
        pool_matches(b.manifest, pool_file)
    if text is not None:
        ids = b.tokenizer.encode(text)
    if not ids:
        raise BundleError("no tokens to run")
    return b.logits(ids)
