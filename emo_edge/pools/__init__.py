"""Domain pools: discovering, cataloguing, composing and measuring the expert subsets a domain uses.

The exporter's entry points:
    resolve_pools(view, ["math", "code", "my.json"], catalog=None, fraction=None) -> list[Pool]
    compose(pools) -> per-layer union ([routed ids] or None per layer, source numbering)
See `catalog.py` (format and locations), `discover.py` (methods), `calib.py` (calibration file convention).
"""

from .catalog import (BUILTIN_DOMAINS, DEFAULT_FRACTION, DEFAULT_METHOD, Catalog, Pool, builtin_calib,
                      compose, default_catalog_dir, discover_pool, jaccard, load_pool_path, resolve_pools)

from .sizes import METHODS, pool_sizes

__all__ = ["BUILTIN_DOMAINS", "DEFAULT_FRACTION", "DEFAULT_METHOD", "METHODS", "Catalog", "Pool", "builtin_calib",
           "compose", "default_catalog_dir", "discover_pool", "jaccard", "load_pool_path", "pool_sizes",
           "resolve_pools"]
