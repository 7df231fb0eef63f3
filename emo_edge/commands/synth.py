"""`emo-edge synth OUT --preset tiny|small|emo-14b ...`: synthetic checkpoints in the upstream layout."""

from __future__ import annotations

import json

import click

from ..errors import EmoEdgeError
from ..model.synth import PRESETS, synthesize, with_layers
from ..units import parse_int_list, parse_size
from ..progress import wrap
from .options import NON_NEGATIVE, POSITIVE, FiniteFloatRange


def _int_list(text: str | None, what: str) -> list[int] | None:
    return None if text is None else parse_int_list(text, what, allow_empty=True)


def _nested_list(text: str | None, what: str) -> list[list[int]] | None:
    """'0,3;;5' -> [[0, 3], [], [5]] (one group per layer, ';'-separated)."""
    if text is None:
        return None
    return [_int_list(part, what) or [] for part in text.split(";")]


def register(cli: click.Group) -> None:
    @cli.command("synth")
    @click.argument("out")
    @click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True)
    @click.option("--layers", type=POSITIVE, help="Number of decoder layers (overrides the preset).")
    @click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True)
    @click.option("--shard-size", help="Split weights into shards of at most this size, e.g. 200MB.")
    @click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True)
    @click.option("--vocab", type=POSITIVE, help="Embedding rows (vocab_size).")
    @click.option("--hidden", type=POSITIVE, help="hidden_size")
    @click.option("--intermediate", type=POSITIVE, help="Expert intermediate_size.")
    @click.option("--heads", type=POSITIVE, help="num_attention_heads")
    @click.option("--kv-heads", type=POSITIVE, help="num_key_value_heads (GQA)")
    @click.option("--head-dim", type=POSITIVE)
    @click.option("--experts", type=NON_NEGATIVE, help="num_experts per MoE layer")
    @click.option("--top-k", type=POSITIVE, help="num_experts_per_tok (counts shared/always-active experts)")
    @click.option("--shared", type=NON_NEGATIVE, help="num_shared_experts (the last n experts)")
    @click.option("--always-active", help="always_active_experts, e.g. 0,5")
    @click.option("--always-active-per-layer", help="per-layer always-active ids, ';' between layers: '0;1,2;;0'")
    @click.option("--experts-per-layer", help="num_experts_per_layer, e.g. 8,6,0,8 (0 = dense layer)")
    @click.option("--shared-per-layer", help="num_shared_experts_per_layer, e.g. 1,1,0,2")
    @click.option("--dense-intermediate", type=POSITIVE, help="dense_intermediate_size for dense layers")
    @click.option("--dense-mlp-bias/--no-dense-mlp-bias", default=None)
    @click.option("--norm-topk/--no-norm-topk", default=None, help="norm_topk_prob")
    @click.option("--attention-bias/--no-attention-bias", default=None)
    @click.option("--tie/--no-tie", default=None, help="tie_word_embeddings")
    @click.option("--rope-theta", type=FiniteFloatRange(min=0.0, min_open=True))
    @click.option("--rope-scaling", help='rope_scaling JSON, e.g. \'{"rope_type": "linear", "factor": 2.0}\'')
    @click.option("--max-positions", type=int, help="max_position_embeddings (-1 = unknown)")
    @click.option("--plant", is_flag=True, help="Plant two domains (digits / letters) routed to disjoint expert groups.")
    @click.option("--force", is_flag=True, help="Replace OUT if it exists.")
    def synth_cmd(out, preset, layers, dtype, shard_size, seed, vocab, hidden, intermediate, heads, kv_heads,
                  head_dim, experts, top_k, shared, always_active, always_active_per_layer, experts_per_layer,
                  shared_per_layer, dense_intermediate, dense_mlp_bias, norm_topk, attention_bias, tie, rope_theta,
                  rope_scaling, max_positions, plant, force):
        """Write a synthetic EMO checkpoint in exactly the upstream layout."""
        shape = PRESETS[preset]
        changes = {k: v for k, v in dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                         num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                         num_experts=experts, top_k=top_k, num_shared=shared).items() if v is not None}
        if heads is not None and kv_heads is None:
            changes["num_kv_heads"] = heads
        shape = with_layers(shape, **changes)
        if rope_scaling is not None:
            try:
                rope_scaling = json.loads(rope_scaling)
            except json.JSONDecodeError:
                raise EmoEdgeError(f"--rope-scaling is not valid JSON: {rope_scaling}") from None
        per_layer = _int_list(experts_per_layer, "--experts-per-layer")
        if per_layer is not None and layers is None:
            layers = len(per_layer)
        overrides = dict(
            always_active_experts=_int_list(always_active, "--always-active"),
            always_active_experts_per_layer=_nested_list(always_active_per_layer, "--always-active-per-layer"),
            num_experts_per_layer=per_layer,
            num_shared_experts_per_layer=_int_list(shared_per_layer, "--shared-per-layer"),
            dense_intermediate_size=dense_intermediate, dense_mlp_bias=dense_mlp_bias, norm_topk_prob=norm_topk,
            attention_bias=attention_bias, tie_word_embeddings=tie, rope_theta=rope_theta, rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
        )
        if per_layer and 0 in per_layer and dense_intermediate is None:
            overrides["dense_intermediate_size"] = 2 * shape.intermediate_size
        size = parse_size(shard_size, "--shard-size") if shard_size else None
        path = synthesize(out, shape, config_overrides=overrides, layers=layers, dtype=dtype, shard_size=size,
                          seed=seed, plant=plant, force=force,
                          progress=lambda it: wrap(it, "writing tensors", "tensor"))
        click.echo(f"wrote {path}")
