"""EmoSpec: the model's hyperparameters and routing rules, parsed and validated from `config.json`.

This is the one place that knows what each config field means. Field names and defaults follow the upstream
`EmoConfig` (allenai/EMO, `src/hf_trust_remote_code/emo/configuration_emo.py`); the semantics follow its
`modeling_emo.py`. We never import or execute either file. The file is parsed strictly (`schema.load_json`: no
NaN/Infinity, bounded size and nesting) and typed by `hfconfig.ConfigFile` (strict ints, finite floats, bounded
counts, typed lists) before any relation between fields is checked here.

Routing per MoE layer (`LayerSpec.routing`):
- "topk":          softmax over all E logits, top-k.
- "shared":        the LAST n experts are shared. Softmax over the first E-n logits, top-(k-n) of those; the n
                   shared experts get their own softmax over their n logits and are always chosen.
- "always_active": softmax over all E logits; the listed experts are always chosen with their own probability;
                   top-(k - n_always) among the others. Takes precedence over `num_shared_experts` (as upstream).
- "dense":         no experts; a SwiGLU MLP of `dense_intermediate_size` (with biases when `dense_mlp_bias`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .hfconfig import ConfigFile, RopeScalingFile
from ..schema import load_json, validate

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
MAX_CONTEXT = 1 << 20  # tokens: a hard cap on any export context (RoPE tables and KV cache are sized by it)


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
    def num_implicit(self) -> int:
        """len(implicit_experts), without building it."""
        if self.num_experts == 0:
            return 0
        return len(self.always_active) if self.always_active else self.num_shared

    @property
    def routed_k(self) -> int:
        """How many routed experts each token picks."""
        return self.top_k - self.num_implicit


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
def _normalise_rope_scaling(rope: RopeScalingFile | None, where: str) -> dict | None:
    if rope is None:
        return None
    rope_type = rope.rope_type if rope.rope_type is not None else rope.type
    if rope_type is None:
        raise ConfigError(f"{where}: 'rope_scaling' has no 'rope_type' (or 'type')")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{where}: rope_scaling type '{rope_type}' is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    if rope_type == "default":
        return None
    if rope.factor is None:
        raise ConfigError(f"{where}: rope_scaling '{rope_type}' needs a positive 'factor', got None")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if getattr(rope, key) is None:
                raise ConfigError(f"{where}: rope_scaling 'llama3' needs '{key}'")
        if rope.low_freq_factor >= rope.high_freq_factor:
            raise ConfigError(f"{where}: rope_scaling 'llama3' needs low_freq_factor < high_freq_factor")
    # the fields as given (validated ones typed, extra keys kept; null = unset), rope_type normalised
    out = {k: v for k, v in rope.model_dump(exclude={"type", "rope_type"}, exclude_unset=True).items()
           if v is not None}
    return {"rope_type": rope_type, **out}


def _per_layer(cfg: ConfigFile, name: str, num_layers: int, where: str) -> list | None:
    value = getattr(cfg, name)
    if value is not None and len(value) != num_layers:
        raise ConfigError(f"{where}: '{name}' must be a list of {num_layers} entries (one per layer), "
                          f"got {len(value)}")
    return value


def _layer_specs(cfg: ConfigFile, num_layers: int, top_k: int, where: str) -> tuple[LayerSpec, ...]:
    num_experts, num_shared = cfg.num_experts, cfg.num_shared_experts
    if num_shared > num_experts:
        raise ConfigError(f"{where}: num_shared_experts ({num_shared}) > num_experts ({num_experts})")
    counts = _per_layer(cfg, "num_experts_per_layer", num_layers, where)
    if counts is not None:
        shared = _per_layer(cfg, "num_shared_experts_per_layer", num_layers, where) or \
            [min(num_shared, n) for n in counts]
    else:
        counts = [num_experts] * num_layers
        shared = [num_shared] * num_layers  # upstream ignores num_shared_experts_per_layer here
    always = _per_layer(cfg, "always_active_experts_per_layer", num_layers, where)
    if always is None and cfg.always_active_experts is not None:
        always = [cfg.always_active_experts] * num_layers

    layers = []
    for i in range(num_layers):
        n, s = counts[i], shared[i]
        aa = tuple(always[i]) if always is not None and always[i] else ()
        if n == 0:
            layers.append(LayerSpec(i, 0, 0, (), top_k))
            continue
        if s > n:
            raise ConfigError(f"{where}: layer {i}: {s} shared experts > {n} experts")
        if any(not 0 <= e < n for e in aa) or len(set(aa)) != len(aa):
            raise ConfigError(f"{where}: layer {i}: always_active_experts {list(aa)} must be distinct ids in [0, {n})")
        layer = LayerSpec(i, n, s, aa, top_k)
        if layer.routed_k < 0:
            raise ConfigError(f"{where}: layer {i}: num_experts_per_tok ({top_k}) is smaller than its "
                              f"{layer.num_implicit} shared/always-active experts")
        if layer.routed_k > n - layer.num_implicit:
            raise ConfigError(f"{where}: layer {i}: num_experts_per_tok ({top_k}) needs {layer.routed_k} routed "
                              f"experts per token but the layer has only {n - layer.num_implicit}")
        layers.append(layer)
    return tuple(layers)


def _head_dim(cfg: ConfigFile, hidden: int, heads: int, where: str) -> int:
    head_dim = cfg.head_dim
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"{where}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}); set head_dim")
        head_dim = hidden // heads
    if head_dim % 2:
        raise ConfigError(f"{where}: head_dim ({head_dim}) must be even for RoPE")
    return head_dim


def spec_from_config(data: Any, where: str = "config.json") -> EmoSpec:
    """Parse and validate an upstream-format config dict. `where` names the file in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    if data.get("model_type") != "emo":
        raise ConfigError(f"{where}: unknown model_type {data.get('model_type')!r} (expected 'emo')")
    cfg: ConfigFile = validate(data, ConfigFile, where, ConfigError)
    act = cfg.hidden_act or "silu"
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act '{act}' is not supported (EMO uses 'silu')")
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads or heads
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    head_dim = _head_dim(cfg, hidden, heads, where)
    max_pos = cfg.max_position_embeddings
    max_pos = None if max_pos is None or max_pos <= 0 else max_pos
    rope = _normalise_rope_scaling(cfg.rope_scaling, where)
    if rope and rope["rope_type"] in ("dynamic", "yarn") and max_pos is None and \
            "original_max_position_embeddings" not in rope:
        raise ConfigError(f"{where}: rope_scaling '{rope['rope_type']}' needs max_position_embeddings, which is unknown (-1)")
    layers = _layer_specs(cfg, cfg.num_hidden_layers, cfg.num_experts_per_tok, where)
    if any(layer.num_experts == 0 for layer in layers) and not cfg.dense_intermediate_size:
        raise ConfigError(f"{where}: a layer has 0 experts (dense) but dense_intermediate_size is not set")
    if cfg.rope_theta is not None and cfg.rope_theta <= 1:  # log(theta) divides in YaRN; theta <= 1 is no RoPE
        raise ConfigError(f"{where}: field 'rope_theta': must be > 1 (got {cfg.rope_theta!r})")
    norm_topk = bool(cfg.norm_topk_prob)
    if norm_topk and any(layer.num_implicit for layer in layers):
        raise ConfigError(f"{where}: norm_topk_prob with shared or always-active experts is undefined upstream; refusing")
    return EmoSpec(
        vocab_size=cfg.vocab_size,
        hidden_size=hidden,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(1e-6 if cfg.rms_norm_eps is None else cfg.rms_norm_eps),
        rope_theta=float(500000.0 if cfg.rope_theta is None else cfg.rope_theta),
        rope_scaling=rope,
        max_position_embeddings=max_pos,
        attention_bias=bool(cfg.attention_bias),
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        norm_topk_prob=norm_topk,
        dense_intermediate_size=cfg.dense_intermediate_size,
        dense_mlp_bias=bool(cfg.dense_mlp_bias),
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        layers=layers,
    )


def check_context(spec: EmoSpec, context: Any) -> int:
    """An export context length, refused unless a positive integer <= MAX_CONTEXT (the RoPE tables and KV
    cache are sized by it, so an absurd one would exhaust memory rather than fail)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ConfigError(f"context must be a positive integer, got {context!r}")
    if context > MAX_CONTEXT:
        model = f" (the model's max_position_embeddings is {spec.max_position_embeddings})" \
            if spec.max_position_embeddings else ""
        raise ConfigError(f"context {context} tokens is above the limit of {MAX_CONTEXT}{model}; "
                          f"give a smaller --context")
    return context


def load_spec(checkpoint_dir: str | Path) -> EmoSpec:
    """The spec of a checkpoint directory's config.json (refused if it leads outside, see models.checkpoint_file)."""
    from .locate import checkpoint_file

    path = checkpoint_file(checkpoint_dir, "config.json", ConfigError)
    data = load_json(path, ConfigError, "not found (is this an EMO checkpoint directory?)")
    return spec_from_config(data, where=str(path))
