"""Static scales of an int8 KV cache, calibrated on the built-in calibration text.

onnxruntime 1.32's CPU GroupQueryAttention stores an int8 cache natively (k_quant_type / v_quant_type
"PER_CHANNEL", kv_cache_bit_width 8): code = clip(rint(x / scale[h, d]), -128, 127) for the rotated key (and the
value) of kv head h, dimension d, with `k_scale` / `v_scale` fp32 [kv_heads * head_dim] inputs (pinned by
tests/export/test_quant.py). The scales are constants of the graph, so they are measured here, before the build:

    calibration documents (emo_edge/data/calib, CALIB_DOCS per domain, <= CALIB_TOKENS tokens each)
      --reference restricted to the bundle's experts, one sweep through the layers-->
    per layer: absmax over every token of k (after RoPE) and v, per (kv head, dim)
      --> scale = max(absmax, FLOOR) * MARGIN / 127

MARGIN leaves room for tokens beyond the calibration's range (they saturate at +-127/128 x scale instead of
wrapping); the verification of the bundle (held-out text, not the calibration text) judges the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIB_DIR = Path(__file__).resolve().parents[1] / "data" / "calib"
CALIB_DOCS = 4  # documents per built-in domain file
CALIB_TOKENS = 64  # tokens per document
MARGIN = 1.25
FLOOR = 1e-6  # a channel that is always zero still needs a positive scale


@dataclass(frozen=True)
class KVScales:
    """Per layer (k_scale, v_scale), fp32 [kv_heads * head_dim], and where they came from (for the report)."""

    scales: list
    provenance: dict


def calibrate(view, experts, progress=None) -> KVScales:
    """The int8 KV scales of a bundle keeping `experts` (per layer, None for all/dense) of `view`'s model."""
    import torch

    from ..pools.calib import load_calibration
    from ..pools.discover import advance, start_states
    from ..model.reference import Reference, rms_norm
    from ..model.tokenizer import TextTokenizer

    spec = view.spec
    big = spec.vocab_size * spec.hidden_size * spec.num_layers > 2e9 or spec.intermediate_size >= 512
    ref = Reference(view, pool=experts, streaming=big)
    tok = TextTokenizer(Path(view.root) / "tokenizer.json")
    files = sorted(CALIB_DIR.glob("*.jsonl"))
    cal = load_calibration(files, tok, max_tokens=CALIB_TOKENS, max_docs=CALIB_DOCS)
    docs = [[t for t in d if t < spec.vocab_size] for d in cal.docs]
    docs = [d for d in docs if len(d) >= 2]
    scales = []
    with torch.no_grad():
        states = start_states(ref, docs)
        for i in range(spec.num_layers):
            layer = ref.layer(i)
            kmax = vmax = None
            for s in states:
                _, (k, v) = layer.attention(rms_norm(s.h, layer.attn_norm, spec.rms_norm_eps), s.cos, s.sin, None)
                km, vm = (t.abs().amax(dim=(0, 2)) for t in (k, v))  # (kv_heads, head_dim)
                kmax = km if kmax is None else torch.maximum(kmax, km)
                vmax = vm if vmax is None else torch.maximum(vmax, vm)
            scales.append(tuple(np.maximum(m.double().numpy().reshape(-1), FLOOR).astype(np.float32)
                                * np.float32(MARGIN / 127) for m in (kmax, vmax)))
            advance(layer, states, ref.masks[i])
            if progress:
                progress(1)
    return KVScales(scales, {"files": [f.name for f in cal.files], "documents": len(docs),
                             "tokens": sum(map(len, docs)), "margin": MARGIN, "granularity": "per channel"})
