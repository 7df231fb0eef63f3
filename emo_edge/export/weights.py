"""Reading and slicing one layer's tensors for the bundle: router rows of the kept experts (remapped to
0..r-1 in ascending source order), implicit (shared / always-active) experts, attention and norms."""

from __future__ import annotations

import numpy as np

from ..model.checkpoint import CheckpointView
from ..model.names import TensorKey
from exporters.onnx import LayerWeights


def _np(view: CheckpointView, key: TensorKey, rows=None) -> np.ndarray:
    return view.tensor(key, rows=rows).numpy().astype(np.float32, copy=False)


def expert(view: CheckpointView, i: int, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(_np(view, TensorKey(r, i, j)) for r in ("expert_gate", "expert_up", "expert_down"))


def remap(layer, kept: list[int] | None) -> dict:
    """The manifest's record of one layer: source ids of the bundle's experts and their bundle numbering."""
    if layer.num_experts == 0:
        return {"layer": layer.index, "routing": "dense"}
    return {"layer": layer.index, "routing": layer.routing, "routed_source_ids": list(kept),
            "routed_bundle_ids": list(range(len(kept))), "implicit_source_ids": list(layer.implicit_experts),
            "routed_k": layer.routed_k}


def layer_weights(view: CheckpointView, i: int, kept: list[int] | None) -> LayerWeights:
    spec, layer = view.spec, view.spec.layers[i]
    t = lambda role: _np(view, TensorKey(role, i))  # noqa: E731
    lw = LayerWeights(attn_norm=t("attn_norm"), ffn_norm=t("ffn_norm"), q=t("q"), k=t("k"), v=t("v"), o=t("o"),
                      attn_bias=tuple(t(r) for r in ("q_bias", "k_bias", "v_bias", "o_bias"))
                      if spec.attention_bias else None, routing=layer.routing)
    if layer.num_experts == 0:
        lw.dense = (t("dense_gate"), t("dense_up"), t("dense_down"))
        lw.dense_bias = tuple(t(r) for r in ("dense_gate_bias", "dense_up_bias", "dense_down_bias")) \
            if spec.dense_mlp_bias else None
        return lw
    kept = list(kept)
    impl = list(layer.implicit_experts)
    lw.router_routed = _np(view, TensorKey("router", i), rows=np.array(kept))
    lw.router_implicit = _np(view, TensorKey("router", i), rows=np.array(impl)) if impl else None
    lw.routed_k, lw.n_routed = layer.routed_k, len(kept)
    lw.routed = lambda: (expert(view, i, j) for j in kept)
    lw.implicit = [expert(view, i, j) for j in impl]
    return lw
