"""Synthetic EMO checkpoints in exactly the upstream layout, of any shape and routing variant.

Weights are random but deterministic per tensor name (so a bf16 checkpoint and its fp32 twin hold the same
values up to rounding) and scaled so that routing is diverse and logits are not degenerate. With `plant`, the
checkpoint carries planted domain structure: tokens of two disjoint vocabularies ("digits": numbers and
arithmetic symbols, "letters": words) push the residual stream along two orthogonal directions, and the router
rows of two disjoint expert groups point along those directions, so each domain's text routes to its own group.
The planted groups are recorded in `synth.json` beside the weights.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import EmoEdgeError
from .hfconfig import emo_config
from .names import TensorKey, expected_tensors
from .spec import EmoSpec, spec_from_config
from .tokenizer import TextTokenizer, tokenizer_files, train_bpe
from .writer import write_checkpoint


@dataclass(frozen=True)
class SynthShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    top_k: int
    num_shared: int = 1
    head_dim: int | None = None
    tokenizer_vocab: int = 512  # BPE size; the embedding is padded up to vocab_size like dolma2's


PRESETS: dict[str, SynthShape] = {
    "tiny": SynthShape(512, 64, 32, 2, 4, 2, 8, 3, tokenizer_vocab=512),
    "small": SynthShape(2048, 256, 128, 4, 8, 4, 32, 4, tokenizer_vocab=2048),
    # the released allenai/Emo_1b14b_1T shape
    "emo-14b": SynthShape(100352, 2048, 1024, 16, 16, 16, 128, 8, head_dim=128, tokenizer_vocab=4096),
}

PLANT_DOMAINS = ("digits", "letters")
_DIGIT_CHARS = set("0123456789+-*/=(). \n")
_LETTER_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ \n")
_WORDS = ("the river runs past old stone houses where children play and birds sing in tall green trees "
          "every morning a quiet baker opens her shop and warm bread fills the narrow street with a sweet smell "
          "travelers stop to rest and talk about distant hills cold lakes bright markets and long winter roads").split()


def synth_corpus(n_docs: int = 400, seed: int = 0) -> list[str]:
    """Deterministic project-generated text for tokenizer training and planted-domain demos: half
    arithmetic ("digits"), half word sentences ("letters")."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        if i % 2 == 0:
            docs.append(digits_doc(rng))
        else:
            docs.append(letters_doc(rng))
    return docs


def digits_doc(rng: random.Random, lines: int = 12) -> str:
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        op = rng.choice("+-*/")
        value = {"+": a + b, "-": a - b, "*": a * b, "/": round(a / b, 2)}[op]
        out.append(f"({a} {op} {b}) = {value}")
    return " ".join(out)  # one line: every token of a planted document belongs to its domain


def letters_doc(rng: random.Random, sentences: int = 6) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
        out.append(" ".join(words).capitalize())
    return " ".join(out)


def token_domains(tok: TextTokenizer) -> dict[str, list[int]]:
    """Split the tokenizer's vocabulary into the planted domains by the characters each token stands for."""
    groups: dict[str, list[int]] = {d: [] for d in PLANT_DOMAINS}
    for i, text in tok.decoded_vocab().items():
        chars = set(text)
        if not text.strip():
            continue
        if chars <= _DIGIT_CHARS:  # numbers, operators, brackets (whitespace-only tokens stay neutral)
            groups["digits"].append(i)
        elif chars <= _LETTER_CHARS and any(c.isalpha() for c in chars):
            groups["letters"].append(i)
    return groups


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


class WeightMaker:
    """Produces each tensor of a synthetic checkpoint on demand (one at a time)."""

    def __init__(self, spec: EmoSpec, seed: int, plant: dict | None):
        self.spec, self.seed, self.plant = spec, seed, plant
        by_name = expected_tensors(spec)
        self.keys = {key.hf_name: key for key in by_name}
        self.shapes = {key.hf_name: shape for key, shape in by_name.items()}
        if plant:
            d = np.linalg.qr(_rng(seed, "plant-directions").standard_normal((spec.hidden_size, 4)))[0].T
            self.directions = d[:2].astype(np.float32)  # (2, H) orthonormal: where a domain's tokens point
            self.outputs = d[2:].astype(np.float32)  # (2, H): what a domain's experts write, the head reads
            self.expert_domain = {(int(layer), e): dom for layer, groups in plant["groups"].items()
                                  for dom, ids in groups.items() for e in ids}

    def __call__(self, name: str) -> np.ndarray:
        key, shape = self.keys[name], self.shapes[name]
        spec, rng = self.spec, _rng(self.seed, name)
        H = spec.hidden_size
        normal = lambda std: (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))  # noqa: E731
        role = key.role
        if role in ("attn_norm", "ffn_norm", "final_norm"):
            return 1.0 + normal(0.1)
        if role.endswith("_bias"):
            return normal(0.1)
        if role == "embed":
            return self._embed(normal)
        if role == "lm_head":
            return self._head(normal) if self.plant else normal(1.0 / np.sqrt(H))
        if role in ("q", "k", "v"):
            return normal(1.0 / np.sqrt(H))
        if role == "o":
            return normal(0.3 / np.sqrt(shape[1]))
        if role == "router":
            return self._router(key, normal)
        if self.plant and (key.layer, key.expert) in self.expert_domain:
            return self._planted_expert(key, normal)
        if role in ("expert_gate", "expert_up", "dense_gate", "dense_up"):
            return normal(1.0 / np.sqrt(H))
        if role in ("expert_down", "dense_down"):
            return normal(0.5 / np.sqrt(shape[1]))
        raise EmoEdgeError(f"synth: no recipe for tensor role '{role}'")

    def _embed(self, normal) -> np.ndarray:
        if not self.plant:
            return normal(1.0)
        w = normal(0.6)
        scale = np.float32(np.sqrt(self.spec.hidden_size))
        for d, domain in enumerate(PLANT_DOMAINS):
            ids = np.asarray(self.plant["tokens"][domain], dtype=np.int64)
            w[ids] += scale * self.directions[d]
        return w

    def _planted_expert(self, key: TensorKey, normal) -> np.ndarray:
        """A planted domain's expert fires on its domain's tokens (gate and up read the domain's token direction)
        and writes the domain's output direction, which the head reads back for that domain's tokens: the model
        predicts in-domain tokens through its own experts, so routing to the wrong pool really costs perplexity."""
        H, I = self.spec.hidden_size, self.spec.intermediate_size
        d = PLANT_DOMAINS.index(self.expert_domain[(key.layer, key.expert)])
        if key.role in ("expert_gate", "expert_up"):
            w = normal(0.5 / np.sqrt(H))
            return w + np.float32(2.5 / np.sqrt(H)) * np.ones((I, 1), np.float32) * self.directions[d]
        w = normal(0.5 / np.sqrt(I))
        return w + np.float32(0.4 * np.sqrt(H) / I) * self.outputs[d][:, None] * np.ones((1, I), np.float32)

    def _head(self, normal) -> np.ndarray:
        H = self.spec.hidden_size
        w = normal(1.0 / np.sqrt(H))
        for d, domain in enumerate(PLANT_DOMAINS):
            ids = np.asarray(self.plant["tokens"][domain], dtype=np.int64)
            w[ids] += np.float32(6.0 / np.sqrt(H)) * self.outputs[d]
        return w

    def _router(self, key: TensorKey, normal) -> np.ndarray:
        H = self.spec.hidden_size
        if not self.plant:
            return normal(2.0 / np.sqrt(H))
        # token-specific noise (orthogonal to the planted directions, so no expert gets a constant bias) spreads
        # a domain's tokens over all of its group's experts; the planted direction keeps them inside the group
        w = normal(1.5 / np.sqrt(H))
        w -= (w @ self.directions.T) @ self.directions
        for d, domain in enumerate(PLANT_DOMAINS):
            ids = self.plant["groups"][str(key.layer)][domain]
            w[ids] += np.float32(10.0 / np.sqrt(H)) * self.directions[d]
        return w


def planted_groups(spec: EmoSpec) -> dict[str, dict[str, list[int]]]:
    """Per MoE layer: the routed experts split into two disjoint halves, one per planted domain."""
    groups = {}
    for layer in spec.moe_layers:
        routed = list(layer.routed_experts)
        half = len(routed) // 2
        if half < layer.routed_k:
            raise EmoEdgeError(f"--plant needs at least {2 * layer.routed_k} routed experts in layer {layer.index} "
                               f"(it has {len(routed)})")
        groups[str(layer.index)] = {PLANT_DOMAINS[0]: routed[:half], PLANT_DOMAINS[1]: routed[half:2 * half]}
    return groups


def build_config(shape: SynthShape, *, layers: int | None = None, **overrides) -> dict:
    num_layers = layers or shape.num_layers
    args = dict(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim, num_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
        num_shared_experts=shape.num_shared,
    )
    args.update({k: v for k, v in overrides.items() if v is not None})
    return emo_config(**args)


def synthesize(out: str | Path, shape: SynthShape, *, config_overrides: dict | None = None, layers: int | None = None,
               dtype: str = "bf16", shard_size: int | None = None, seed: int = 0, plant: bool = False,
               force: bool = False, progress=None) -> Path:
    """Write a synthetic checkpoint. Returns its directory."""
    config = build_config(shape, layers=layers, **(config_overrides or {}))
    config["torch_dtype"] = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(dtype, dtype)
    spec = spec_from_config(config, where="synthetic config")
    tok_vocab = min(shape.tokenizer_vocab, spec.vocab_size)
    tok_json = train_bpe(synth_corpus(), tok_vocab)
    extra = tokenizer_files(tok_json, spec.max_position_embeddings or 4096)
    meta: dict = {"generator": "emo-edge synth", "seed": seed, "dtype": dtype}
    plant_info = None
    if plant:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tokenizer.json"
            path.write_text(tok_json)
            tokens = token_domains(TextTokenizer(path))
        plant_info = {"tokens": tokens, "groups": planted_groups(spec)}
        meta["plant"] = {"domains": list(PLANT_DOMAINS), "groups": plant_info["groups"]}
    extra["synth.json"] = (json.dumps(meta, indent=1) + "\n").encode()
    extra["generation_config.json"] = (json.dumps(
        {"eos_token_id": spec.eos_token_id, "pad_token_id": spec.pad_token_id}, indent=2) + "\n").encode()
    maker = WeightMaker(spec, seed, plant_info)
    return write_checkpoint(out, config, maker.shapes, maker, dtype=dtype, shard_size=shard_size,
                            extra_files=extra, force=force, progress=progress)


def with_layers(shape: SynthShape, **changes) -> SynthShape:
    return replace(shape, **changes)
