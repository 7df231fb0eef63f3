"""The `--pools` argument of export: catalog names, built-in domains, pool files or `all` -> the per-layer union
of routed experts to keep (source numbering; None for dense layers), plus a description of each pool."""

from __future__ import annotations

from ..errors import PoolError
from ..pools import compose, resolve_pools
from ..spec import EmoSpec


def expert_scores(pools) -> list[dict[int, float] | None]:
    """Per layer: each expert's best score share over the pools (from their catalog statistics), or None."""
    n = len(pools[0].layers) if pools else 0
    out: list[dict[int, float] | None] = [None] * n
    for pool in pools:
        for i, st in enumerate(pool.stats or []):
            if st and st.get("scores"):
                layer = out[i] if out[i] is not None else {}
                for e, v in st["scores"].items():
                    layer[int(e)] = max(layer.get(int(e), 0.0), float(v))
                out[i] = layer
    return out


def resolve_pool_layers(view, pools: str, spec: EmoSpec, progress=None,
                        log=None) -> tuple[list, list[dict], list | None]:
    """`progress`/`log`: shown while a built-in domain is discovered (see `resolve_pools`)."""
    names = [n.strip() for n in pools.split(",") if n.strip()]
    if not names:
        raise PoolError("--pools is empty")
    if names == ["all"]:
        layers = [None if layer.num_experts == 0 else list(layer.routed_experts) for layer in spec.layers]
        return layers, [{"name": "all"}], None
    resolved = resolve_pools(view, names, progress=progress, log=log)
    union = compose(resolved)
    layers = [None if layer.num_experts == 0 else (list(layer.routed_experts) if entry is None else list(entry))
              for layer, entry in zip(spec.layers, union)]
    scores = expert_scores(resolved)
    return (layers, [{"name": p.name, "method": p.method, "layers": p.layers} for p in resolved],
            scores if any(s is not None for s in scores) else None)
