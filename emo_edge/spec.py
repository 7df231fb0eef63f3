"""EmoSpec: the model's hyperparameters and routing rules, parsed and validated from `config.json`.

This is the one place that knows what each config field means. Field names and defaults follow the upstream
`EmoConfig` (allenai/EMO, `src/hf_trust_remote_code/emo/configuration_emo.py`); the semantics follow its
`modeling_emo.py`. We never import or execute either file.

Routing per MoE layer (`LayerSpec.routing`):
- "topk":          softmax over all E logits, top-k.
- "shared":        the LAST n experts are shared. Softmax over the first E-n logits, top-(k-n) of those; the n
                   shared experts get their own softmax over their n logits and are always chosen.
- "always_active": softmax over all E logits; the listed experts are always chosen with their own probability;
                   top-(k - n_always) among the others. Takes precedence over `num_shared_experts` (as upstream).
- "dense":         no experts; a SwiGLU MLP of `dense_intermediate_size` (with biases when `dense_mlp_bias`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class LayerSpec:
    index: int
    num_experts: int  # 0: dense layer
    num_shared: int  # legacy shared experts: the last `num_shared` ids
    always_active: tuple[int, ...]  # always-active expert ids (empty if none)
    top_k: int  # experts per token, implicit ones included

    @property
    def routing(self) -> str:
        if self.num_experts == 0:
            return "dense"
        if self.always_active:
            return "always_active"
        if self.num_shared > 0:
            return "shared"
        return "topk"

    @property
    def implicit_experts(self) -> tuple[int, ...]:
        """Experts chosen for every token, never counted in a pool and always kept."""
        if self.routing == "always_active":
            return tuple(sorted(self.always_active))
        if self.routing == "shared":
            return tuple(range(self.num_experts - self.num_shared, self.num_experts))
        return ()

    @property
    def routed_experts(self) -> tuple[int, ...]:
        """Experts that compete in top-k: the candidates a pool chooses among."""
        implicit = set(self.implicit_experts)
        return tuple(e for e in range(self.num_experts) if e not in implicit)

    @property
    def routed_k(self) -> int:
        """How many routed experts each token picks."""
        return self.top_k - len(self.implicit_experts)


@dataclass(frozen=True)
class EmoSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # normalised: has "rope_type"
    max_position_embeddings: int | None  # None when the checkpoint says -1 (unknown)
    attention_bias: bool
    tie_word_embeddings: bool
    norm_topk_prob: bool
    dense_intermediate_size: int | None
    dense_mlp_bias: bool
    eos_token_id: int | None
    pad_token_id: int | None
    bos_token_id: int | None
    layers: tuple[LayerSpec, ...]

    # ---- derived facts -------------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        return self.layers[0].top_k if self.layers else 0

    @property
    def moe_layers(self) -> tuple[LayerSpec, ...]:
        return tuple(layer for layer in self.layers if layer.num_experts > 0)

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    def routing_variant(self) -> str:
        kinds = sorted({layer.routing for layer in self.layers})
        return "+".join(kinds)

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- parameter accounting (shapes only; nothing is read) -------------------------------------------
    def attention_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        n = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            n += q + 2 * kv + h
        return n

    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def dense_mlp_params(self) -> int:
        d = self.dense_intermediate_size or 0
        n = 3 * self.hidden_size * d
        if self.dense_mlp_bias:
            n += 2 * d + self.hidden_size
        return n

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def param_counts(self) -> dict[str, int]:
        """Total and per-token-active parameter counts, by component."""
        h = self.hidden_size
        emb = self.embedding_params()
        head = 0 if self.tie_word_embeddings else emb
        attn = self.num_layers * self.attention_params()
        norms = self.num_layers * 2 * h + h
        experts_total = sum(layer.num_experts for layer in self.layers) * self.expert_params()
        experts_active = sum(layer.top_k for layer in self.moe_layers) * self.expert_params()
        routers = sum(layer.num_experts for layer in self.layers) * h
        dense = sum(1 for layer in self.layers if layer.num_experts == 0) * self.dense_mlp_params()
        backbone = attn + norms + routers + dense
        return {
            "total": emb + head + backbone + experts_total,
            # active per token: one embedding row is read, the head is a full matmul
            "active": h + head + backbone + experts_active if not self.tie_word_embeddings
            else emb + backbone + experts_active,
            "embedding": emb,
            "lm_head": head,
            "attention": attn,
            "routers": routers,
            "norms": norms,
            "dense_mlp": dense,
            "experts": experts_total,
            "per_expert": self.expert_params(),
        }


# ---- parsing ---------------------------------------------------------------------------------------------
def _get(cfg: dict, key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def _int(cfg: dict, key: str, default: Any = None, *, where: str, minimum: int = 0) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: required field '{key}' is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _normalise_rope_scaling(raw: Any, where: str) -> dict | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'rope_scaling' must be an object or null, got {raw!r}")
    rope = dict(raw)
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type is None:
        raise ConfigError(f"{where}: 'rope_scaling' has no 'rope_type' (or 'type')")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{where}: rope_scaling type '{rope_type}' is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    rope["rope_type"] = rope_type
    rope.pop("type", None)
    if rope_type == "default":
        return None
    factor = rope.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise ConfigError(f"{where}: rope_scaling '{rope_type}' needs a positive 'factor', got {factor!r}")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if not isinstance(rope.get(key), (int, float)):
                raise ConfigError(f"{where}: rope_scaling 'llama3' needs '{key}'")
        if rope["low_freq_factor"] >= rope["high_freq_factor"]:
            raise ConfigError(f"{where}: rope_scaling 'llama3' needs low_freq_factor < high_freq_factor")
    return rope


def _layer_specs(cfg: dict, num_layers: int, top_k: int, where: str) -> tuple[LayerSpec, ...]:
    num_experts = _int(cfg, "num_experts", 7, where=where)
    num_shared = _int(cfg, "num_shared_experts", 0, where=where)
    if num_shared > num_experts:
        raise ConfigError(f"{where}: num_shared_experts ({num_shared}) > num_experts ({num_experts})")
    per_layer = cfg.get("num_experts_per_layer")
    shared_per_layer = cfg.get("num_shared_experts_per_layer")
    always = cfg.get("always_active_experts")
    always_per_layer = cfg.get("always_active_experts_per_layer")

    def check_list(name: str, value: Any) -> list:
        if not isinstance(value, list) or len(value) != num_layers:
            raise ConfigError(f"{where}: '{name}' must be a list of {num_layers} entries (one per layer)")
        return value

    if per_layer is not None:
        counts = check_list("num_experts_per_layer", per_layer)
        shared = (check_list("num_shared_experts_per_layer", shared_per_layer) if shared_per_layer is not None
                  else [min(num_shared, n) for n in counts])
    else:
        counts = [num_experts] * num_layers
        shared = [num_shared] * num_layers  # upstream ignores num_shared_experts_per_layer here
    if always_per_layer is None and always is not None:
        always_per_layer = [always] * num_layers
    if always_per_layer is not None:
        check_list("always_active_experts_per_layer", always_per_layer)

    layers = []
    for i in range(num_layers):
        n, s = counts[i], shared[i]
        for name, v in (("num_experts_per_layer", n), ("num_shared_experts_per_layer", s)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{where}: layer {i}: '{name}' entry must be an integer >= 0, got {v!r}")
        aa = always_per_layer[i] if always_per_layer is not None else None
        aa = tuple(aa) if aa else ()
        if n == 0:
            layers.append(LayerSpec(i, 0, 0, (), top_k))
            continue
        if s > n:
            raise ConfigError(f"{where}: layer {i}: {s} shared experts > {n} experts")
        if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < n for e in aa) or len(set(aa)) != len(aa):
            raise ConfigError(f"{where}: layer {i}: always_active_experts {list(aa)} must be distinct ids in [0, {n})")
        layer = LayerSpec(i, n, s, aa, top_k)
        if layer.routed_k < 0:
            raise ConfigError(f"{where}: layer {i}: num_experts_per_tok ({top_k}) is smaller than its "
                              f"{len(layer.implicit_experts)} shared/always-active experts")
        if layer.routed_k > len(layer.routed_experts):
            raise ConfigError(f"{where}: layer {i}: num_experts_per_tok ({top_k}) needs {layer.routed_k} routed "
                              f"experts per token but the layer has only {len(layer.routed_experts)}")
        layers.append(layer)
    return tuple(layers)


def spec_from_config(cfg: dict, where: str = "config.json") -> EmoSpec:
    """Parse and validate an upstream-format config dict. `where` names the file in errors."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    model_type = cfg.get("model_type")
    if model_type != "emo":
        raise ConfigError(f"{where}: unknown model_type {model_type!r} (expected 'emo')")
    act = _get(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act '{act}' is not supported (EMO uses 'silu')")
    hidden = _int(cfg, "hidden_size", 4096, where=where, minimum=1)
    heads = _int(cfg, "num_attention_heads", 32, where=where, minimum=1)
    kv_heads = cfg.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else _int(cfg, "num_key_value_heads", where=where, minimum=1)
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"{where}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}); set head_dim")
        head_dim = hidden // heads
    else:
        head_dim = _int(cfg, "head_dim", where=where, minimum=2)
    if head_dim % 2:
        raise ConfigError(f"{where}: head_dim ({head_dim}) must be even for RoPE")
    num_layers = _int(cfg, "num_hidden_layers", 32, where=where, minimum=1)
    top_k = _int(cfg, "num_experts_per_tok", 5, where=where, minimum=1)
    max_pos = cfg.get("max_position_embeddings", 4096)
    if max_pos is not None and (isinstance(max_pos, bool) or not isinstance(max_pos, int)):
        raise ConfigError(f"{where}: 'max_position_embeddings' must be an integer, got {max_pos!r}")
    max_pos = None if max_pos is None or max_pos <= 0 else max_pos
    rope = _normalise_rope_scaling(cfg.get("rope_scaling"), where)
    if rope and rope["rope_type"] in ("dynamic", "yarn") and max_pos is None and \
            "original_max_position_embeddings" not in rope:
        raise ConfigError(f"{where}: rope_scaling '{rope['rope_type']}' needs max_position_embeddings, which is unknown (-1)")
    layers = _layer_specs(cfg, num_layers, top_k, where)
    if any(layer.num_experts == 0 for layer in layers) and not cfg.get("dense_intermediate_size"):
        raise ConfigError(f"{where}: a layer has 0 experts (dense) but dense_intermediate_size is not set")
    norm_topk = bool(_get(cfg, "norm_topk_prob", False))
    if norm_topk and any(layer.implicit_experts for layer in layers):
        raise ConfigError(f"{where}: norm_topk_prob with shared or always-active experts is undefined upstream; refusing")
    theta = _get(cfg, "rope_theta", 500000.0)
    eps = _get(cfg, "rms_norm_eps", 1e-6)
    for name, v in (("rope_theta", theta), ("rms_norm_eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{where}: '{name}' must be a positive number, got {v!r}")
    return EmoSpec(
        vocab_size=_int(cfg, "vocab_size", 100352, where=where, minimum=1),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size", 11008, where=where, minimum=1),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(eps),
        rope_theta=float(theta),
        rope_scaling=rope,
        max_position_embeddings=max_pos,
        attention_bias=bool(_get(cfg, "attention_bias", False)),
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        norm_topk_prob=norm_topk,
        dense_intermediate_size=cfg.get("dense_intermediate_size"),
        dense_mlp_bias=bool(_get(cfg, "dense_mlp_bias", False)),
        eos_token_id=cfg.get("eos_token_id", 100257),
        pad_token_id=cfg.get("pad_token_id", 100277),
        bos_token_id=cfg.get("bos_token_id"),
        layers=layers,
    )


def load_spec(checkpoint_dir: str | Path) -> EmoSpec:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (is this an EMO checkpoint directory?)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return spec_from_config(cfg, where=str(path))
