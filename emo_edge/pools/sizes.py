"""How many routed experts a pool keeps per layer, and the discovery method names: torch-free, so that naming,
listing and planning pools (`export --dry-run`) never import the reference model."""

from __future__ import annotations

from typing import Sequence

from ..errors import PoolError
from ..model.spec import EmoSpec

METHODS = ("mass", "layerwise", "easy-ep")


def pool_sizes(spec: EmoSpec, experts: int | Sequence[int] | None = None,
               fraction: float | None = None) -> list[int | None]:
    """Routed experts to keep per layer (None for dense layers). `experts`: one N for all MoE layers, or a list
    with one entry per MoE layer (or per layer; dense layers' entries are ignored). `fraction`: a share of each
    layer's routed experts, rounded half up and raised to the layer's routed top-k."""
    if experts is not None and fraction is not None:
        raise PoolError("give either --experts or --fraction, not both")
    moe = spec.moe_layers
    if not moe:
        raise PoolError("the model has no MoE layers; there is nothing to pool")
    if experts is None:
        f = 0.25 if fraction is None else float(fraction)
        if not 0.0 < f <= 1.0:
            raise PoolError(f"--fraction {fraction} must be in (0, 1]")
        return [None if layer.num_experts == 0 else
                max(layer.routed_k, min(len(layer.routed_experts), int(f * len(layer.routed_experts) + 0.5)))
                for layer in spec.layers]
    if isinstance(experts, int):
        per_moe = [experts] * len(moe)
    else:
        per_moe = list(experts)
        if len(per_moe) == spec.num_layers and len(per_moe) != len(moe):
            per_moe = [n for n, layer in zip(per_moe, spec.layers) if layer.num_experts]
        if len(per_moe) != len(moe):
            raise PoolError(f"--experts lists {len(per_moe)} sizes; the model has {len(moe)} MoE layers "
                            f"({spec.num_layers} layers)")
    sizes: list[int | None] = [None] * spec.num_layers
    for n, layer in zip(per_moe, moe):
        routed = len(layer.routed_experts)
        if n > routed:
            raise PoolError(f"layer {layer.index}: cannot keep {n} experts, it has only {routed} routed experts")
        if n < layer.routed_k:
            raise PoolError(f"layer {layer.index}: a pool of {n} experts is smaller than the {layer.routed_k} "
                            f"routed experts each token needs (top-k)")
        sizes[layer.index] = n
    return sizes
