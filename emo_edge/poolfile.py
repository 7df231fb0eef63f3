"""The pool-file format read by `logits --pool` and `export --pools`: {"layers": [[expert ids...] or null, ...]}
with ids in the source model's numbering; null means a dense layer or all experts."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import PoolError
from .spec import EmoSpec


def parse_pool(data, spec: EmoSpec, where: str) -> list[list[int] | None]:
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise PoolError(f"{where}: expected {{\"layers\": [...]}}")
    if len(layers) != spec.num_layers:
        raise PoolError(f"{where}: has {len(layers)} layers, the model has {spec.num_layers}")
    out: list[list[int] | None] = []
    for i, (entry, layer) in enumerate(zip(layers, spec.layers)):
        if entry is None or layer.num_experts == 0:
            if entry is not None:
                raise PoolError(f"{where}: layer {i} is dense but the pool lists experts for it")
            out.append(None)
            continue
        if not isinstance(entry, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in entry):
            raise PoolError(f"{where}: layer {i} must be a list of expert ids or null")
        bad = [e for e in entry if not 0 <= e < layer.num_experts]
        if bad:
            raise PoolError(f"{where}: layer {i} names expert {bad[0]}, but the layer has {layer.num_experts}")
        routed = sorted(set(entry) - set(layer.implicit_experts))
        if len(routed) < layer.routed_k:
            raise PoolError(f"{where}: layer {i} keeps {len(routed)} routed experts; each token needs {layer.routed_k}")
        out.append(routed)
    return out


def read_pool_file(path: str | Path, spec: EmoSpec) -> list[list[int] | None]:
    from .fsutil import read_json

    return parse_pool(read_json(path, PoolError, "pool file not found"), spec, str(path))


def pool_json(layers: list[list[int] | None]) -> str:
    return json.dumps({"layers": layers}) + "\n"
