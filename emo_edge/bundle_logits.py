"""`emo-edge logits BUNDLE ...`: the bundle's logits in the same format as on a checkpoint (device side, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import pool_matches
from .errors import BundleError, PoolError


def bundle_logits(path: Path, ids: list[int], pool: str | None, text: str | None) -> np.ndarray:
    """Logits (S, V) of `ids` (or `text`) from a bundle. Static: `pool` is a pool file that must name the
    bundle's experts. Swappable: a catalog name or pool file, made resident first (equal to the static bundle
    of that pool)."""
    from .engine import open_engine

    with open_engine(path) as eng:
        if eng.kind == "swappable":
            if pool is None:
                raise PoolError(f"{path} is a swappable bundle: give --pool (one of {', '.join(eng.pools)}, or a "
                                f"pool JSON file)")
        elif pool:
            pool_matches(eng.manifest, pool)
            pool = None
        if text is not None:
            ids = eng.encode(text)
        if not ids:
            raise BundleError("no tokens to run")
        return eng.logits(ids, pool=pool)
