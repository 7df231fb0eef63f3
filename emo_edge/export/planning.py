"""The `--pools` argument of export: catalog names, built-in domains, pool files or `all` -> the per-layer union
of routed experts to keep (source numbering; None for dense layers), plus a description of each pool."""

from __future__ import annotations

from ..errors import PoolError
from ..pools import compose, resolve_pools
from ..spec import EmoSpec


def resolve_pool_layers(view, pools: str, spec: EmoSpec) -> tuple[list, list[dict]]:
    names = [n.strip() for n in pools.split(",") if n.strip()]
    if not names:
        raise PoolError("--pools is empty")
    if names == ["all"]:
        layers = [None if layer.num_experts == 0 else list(layer.routed_experts) for layer in spec.layers]
        return layers, [{"name": "all"}]
    resolved = resolve_pools(view, names)
    union = compose(resolved)
    layers = [None if layer.num_experts == 0 else (list(layer.routed_experts) if entry is None else list(entry))
              for layer, entry in zip(spec.layers, union)]
    return layers, [{"name": p.name, "method": p.method, "layers": p.layers} for p in resolved]
