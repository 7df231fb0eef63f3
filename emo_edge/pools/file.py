"""The pool-file format read by `logits --pool` and `export --pools`: {"layers": [[expert ids...] or null, ...]}
with ids in the source model's numbering; null means a dense layer or all experts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import Field

from ..errors import PoolError
from ..model.hfconfig import MAX_EXPERTS, MAX_LAYERS
from ..schema import Count, Schema, load_json, validate
from ..model.spec import EmoSpec

LayerIds = Optional[Annotated[list[Count], Field(max_length=MAX_EXPERTS)]]


class PoolFile(Schema):
    """A bare pool file, and the `layers` field every catalog entry shares with it."""

    layers: Annotated[list[LayerIds], Field(max_length=MAX_LAYERS)]


def parse_pool(data: Any, spec: EmoSpec, where: str) -> list[list[int] | None]:
    if not isinstance(data, dict) or "layers" not in data:
        raise PoolError(f"{where}: expected {{\"layers\": [...]}}")
    layers = validate(data, PoolFile, where, PoolError).layers
    if len(layers) != spec.num_layers:
        raise PoolError(f"{where}: has {len(layers)} layers, the model has {spec.num_layers}")
    out: list[list[int] | None] = []
    for i, (entry, layer) in enumerate(zip(layers, spec.layers)):
        if entry is None or layer.num_experts == 0:
            if entry is not None:
                raise PoolError(f"{where}: layer {i} is dense but the pool lists experts for it")
            out.append(None)
            continue
        bad = [e for e in entry if not 0 <= e < layer.num_experts]
        if bad:
            raise PoolError(f"{where}: layer {i} names expert {bad[0]}, but the layer has {layer.num_experts}")
        routed = sorted(set(entry) - set(layer.implicit_experts))
        if len(routed) < layer.routed_k:
            raise PoolError(f"{where}: layer {i} keeps {len(routed)} routed experts; each token needs {layer.routed_k}")
        out.append(routed)
    return out


def read_pool_file(path: str | Path, spec: EmoSpec) -> list[list[int] | None]:
    return parse_pool(load_json(path, PoolError, "pool file not found"), spec, str(path))


def pool_json(layers: list[list[int] | None]) -> str:
    return json.dumps({"layers": layers}) + "\n"
