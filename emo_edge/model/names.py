"""The Hugging Face tensor-name table of EMO checkpoints, as data.

A tensor is addressed by a typed `TensorKey` (role, layer, expert); `hf_name` turns it into the upstream name.
`expected_tensors(spec)` lists every tensor a checkpoint of that spec must hold, with its shape: the reader
checks a checkpoint against it before any work, and the synthetic writer emits exactly it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import EmoSpec

# role -> (name template, who uses it)
NAME_TABLE: dict[str, tuple[str, str]] = {
    "embed":        ("model.embed_tokens.weight", "token embedding (vocab, hidden)"),
    "final_norm":   ("model.norm.weight", "RMSNorm before the head"),
    "lm_head":      ("lm_head.weight", "output projection (vocab, hidden); absent when tie_word_embeddings"),
    "attn_norm":    ("model.layers.{layer}.pre_attention_layernorm.weight", "RMSNorm before attention"),
    "ffn_norm":     ("model.layers.{layer}.pre_feedforward_layernorm.weight", "RMSNorm before the MLP/MoE"),
    "q":            ("model.layers.{layer}.self_attn.q_proj.weight", "query projection"),
    "k":            ("model.layers.{layer}.self_attn.k_proj.weight", "key projection (GQA: kv heads)"),
    "v":            ("model.layers.{layer}.self_attn.v_proj.weight", "value projection (GQA: kv heads)"),
    "o":            ("model.layers.{layer}.self_attn.o_proj.weight", "output projection"),
    "q_bias":       ("model.layers.{layer}.self_attn.q_proj.bias", "when attention_bias"),
    "k_bias":       ("model.layers.{layer}.self_attn.k_proj.bias", "when attention_bias"),
    "v_bias":       ("model.layers.{layer}.self_attn.v_proj.bias", "when attention_bias"),
    "o_bias":       ("model.layers.{layer}.self_attn.o_proj.bias", "when attention_bias"),
    "router":       ("model.layers.{layer}.mlp.gate.weight", "MoE router (num_experts, hidden)"),
    "expert_gate":  ("model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight", "expert SwiGLU gate"),
    "expert_up":    ("model.layers.{layer}.mlp.experts.{expert}.up_proj.weight", "expert SwiGLU up"),
    "expert_down":  ("model.layers.{layer}.mlp.experts.{expert}.down_proj.weight", "expert SwiGLU down"),
    "dense_gate":   ("model.layers.{layer}.mlp.gate_proj.weight", "dense-layer SwiGLU gate"),
    "dense_up":     ("model.layers.{layer}.mlp.up_proj.weight", "dense-layer SwiGLU up"),
    "dense_down":   ("model.layers.{layer}.mlp.down_proj.weight", "dense-layer SwiGLU down"),
    "dense_gate_bias": ("model.layers.{layer}.mlp.gate_proj.bias", "when dense_mlp_bias"),
    "dense_up_bias":   ("model.layers.{layer}.mlp.up_proj.bias", "when dense_mlp_bias"),
    "dense_down_bias": ("model.layers.{layer}.mlp.down_proj.bias", "when dense_mlp_bias"),
}


@dataclass(frozen=True, order=True)
class TensorKey:
    role: str
    layer: int | None = None
    expert: int | None = None

    @property
    def hf_name(self) -> str:
        return NAME_TABLE[self.role][0].format(layer=self.layer, expert=self.expert)


def layer_keys(spec: EmoSpec, i: int) -> dict[TensorKey, tuple[int, ...]]:
    """Every tensor of decoder layer `i` with its shape."""
    h, hd = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    out: dict[TensorKey, tuple[int, ...]] = {
        TensorKey("attn_norm", i): (h,),
        TensorKey("ffn_norm", i): (h,),
        TensorKey("q", i): (q, h),
        TensorKey("k", i): (kv, h),
        TensorKey("v", i): (kv, h),
        TensorKey("o", i): (h, q),
    }
    if spec.attention_bias:
        out.update({TensorKey("q_bias", i): (q,), TensorKey("k_bias", i): (kv,),
                    TensorKey("v_bias", i): (kv,), TensorKey("o_bias", i): (h,)})
    layer = spec.layers[i]
    if layer.num_experts == 0:
        d = spec.dense_intermediate_size
        out.update({TensorKey("dense_gate", i): (d, h), TensorKey("dense_up", i): (d, h),
                    TensorKey("dense_down", i): (h, d)})
        if spec.dense_mlp_bias:
            out.update({TensorKey("dense_gate_bias", i): (d,), TensorKey("dense_up_bias", i): (d,),
                        TensorKey("dense_down_bias", i): (h,)})
    else:
        out[TensorKey("router", i)] = (layer.num_experts, h)
        for j in range(layer.num_experts):
            out.update(expert_keys(spec, i, j))
    return out


def expert_keys(spec: EmoSpec, i: int, j: int) -> dict[TensorKey, tuple[int, ...]]:
    h, m = spec.hidden_size, spec.intermediate_size
    return {TensorKey("expert_gate", i, j): (m, h), TensorKey("expert_up", i, j): (m, h),
            TensorKey("expert_down", i, j): (h, m)}


def expected_tensors(spec: EmoSpec) -> dict[TensorKey, tuple[int, ...]]:
    """Every tensor a checkpoint of `spec` holds, in a stable order (embedding, layers, norm, head)."""
    out: dict[TensorKey, tuple[int, ...]] = {TensorKey("embed"): (spec.vocab_size, spec.hidden_size)}
    for i in range(spec.num_layers):
        out.update(layer_keys(spec, i))
    out[TensorKey("final_norm")] = (spec.hidden_size,)
    if not spec.tie_word_embeddings:
        out[TensorKey("lm_head")] = (spec.vocab_size, spec.hidden_size)
    return out
