"""`config.json` in the exact upstream layout (allenai/EMO's EmoConfig fields and defaults): building it
(`emo_config`) and its typed schema for reading (`ConfigFile`)."""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field

from ..schema import Count, Finite, Int, Positive, Schema, Str

UPSTREAM_AUTO_MAP = {
    "AutoConfig": "configuration_emo.EmoConfig",
    "AutoModelForCausalLM": "modeling_emo.EmoForCausalLM",
}


def emo_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
    num_experts: int,
    num_experts_per_tok: int,
    num_shared_experts: int = 0,
    norm_topk_prob: bool = False,
    num_experts_per_layer: list[int] | None = None,
    num_shared_experts_per_layer: list[int] | None = None,
    always_active_experts: list[int] | None = None,
    always_active_experts_per_layer: list[list[int]] | None = None,
    dense_intermediate_size: int | None = None,
    dense_mlp_bias: bool = False,
    attention_bias: bool = False,
    tie_word_embeddings: bool = False,
    rope_theta: float = 500000.0,
    rope_scaling: dict | None = None,
    rms_norm_eps: float = 1e-6,
    max_position_embeddings: int = 4096,
    eos_token_id: int = 0,
    pad_token_id: int = 1,
    bos_token_id: int | None = None,
    torch_dtype: str = "bfloat16",
) -> dict:
    cfg = {
        "architectures": ["EmoForCausalLM"],
        "auto_map": dict(UPSTREAM_AUTO_MAP),
        "model_type": "emo",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads or num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": rms_norm_eps,
        "use_cache": True,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "tie_word_embeddings": tie_word_embeddings,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": attention_bias,
        "attention_dropout": 0.0,
        "num_experts_per_tok": num_experts_per_tok,
        "num_experts": num_experts,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.01,
        "norm_topk_prob": norm_topk_prob,
        "num_shared_experts": num_shared_experts,
        "num_experts_per_layer": num_experts_per_layer,
        "num_shared_experts_per_layer": num_shared_experts_per_layer,
        "always_active_experts": always_active_experts,
        "always_active_experts_per_layer": always_active_experts_per_layer,
        "dense_intermediate_size": dense_intermediate_size,
        "dense_mlp_bias": dense_mlp_bias,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.57.0",
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return cfg


# ---- reading: the typed schema of the config.json fields EmoSpec reads -------------------------------------
# Types and bounds only; the relations between fields (heads vs kv heads, shared vs routed experts, ...) are
# checked by spec.spec_from_config, which knows their meaning. Fields EmoSpec does not read are kept untyped.
MAX_LAYERS = 1 << 16  # far beyond any model; bounds the per-layer tables built before a tensor is seen
MAX_EXPERTS = 1 << 24  # per layer; the checkpoint reader checks the implied tensor count against the headers
PositiveFinite = Annotated[float, Field(allow_inf_nan=False, gt=0)]
Layers = Annotated[int, Field(strict=True, ge=1, le=MAX_LAYERS)]
Experts = Annotated[int, Field(strict=True, ge=0, le=MAX_EXPERTS)]
ExpertIds = Annotated[list[Count], Field(max_length=MAX_EXPERTS)]


class RopeScalingFile(Schema):
    rope_type: Optional[Str] = None
    type: Optional[Str] = None  # the older spelling of rope_type
    factor: Optional[PositiveFinite] = None
    low_freq_factor: Optional[PositiveFinite] = None  # llama3
    high_freq_factor: Optional[PositiveFinite] = None  # llama3
    original_max_position_embeddings: Optional[Positive] = None  # llama3, yarn, dynamic
    attention_factor: Optional[PositiveFinite] = None  # yarn
    mscale: Optional[Finite] = None  # yarn
    mscale_all_dim: Optional[Finite] = None  # yarn
    beta_fast: Optional[PositiveFinite] = None  # yarn
    beta_slow: Optional[PositiveFinite] = None  # yarn
    truncate: Optional[bool] = None  # yarn


class ConfigFile(Schema):
    """config.json as EmoSpec reads it: null where upstream allows it means "the upstream default"."""

    model_type: Optional[Str] = None
    hidden_act: Optional[Str] = None
    vocab_size: Positive = 100352
    hidden_size: Positive = 4096
    intermediate_size: Positive = 11008
    num_hidden_layers: Layers = 32
    num_attention_heads: Positive = 32
    num_key_value_heads: Optional[Positive] = None
    head_dim: Optional[Positive] = None
    max_position_embeddings: Optional[Int] = 4096  # -1 (or any value <= 0): unknown
    rms_norm_eps: Optional[PositiveFinite] = None
    rope_theta: Optional[PositiveFinite] = None
    rope_scaling: Optional[RopeScalingFile] = None
    attention_bias: Optional[bool] = None
    tie_word_embeddings: Optional[bool] = None
    norm_topk_prob: Optional[bool] = None
    num_experts: Experts = 7
    num_experts_per_tok: Positive = 5
    num_shared_experts: Experts = 0
    num_experts_per_layer: Optional[Annotated[list[Experts], Field(max_length=MAX_LAYERS)]] = None
    num_shared_experts_per_layer: Optional[Annotated[list[Experts], Field(max_length=MAX_LAYERS)]] = None
    always_active_experts: Optional[ExpertIds] = None
    always_active_experts_per_layer: Optional[Annotated[list[Optional[ExpertIds]], Field(max_length=MAX_LAYERS)]] = None
    dense_intermediate_size: Optional[Count] = None
    dense_mlp_bias: Optional[bool] = None
    eos_token_id: Optional[Count] = 100257
    pad_token_id: Optional[Count] = 100277
    bos_token_id: Optional[Count] = None
