"""The bundle's small files: genai_config.json, config.json (Hugging Face), tokenizer files, manifest.json (sha256
of every file), report.json and report.md."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .. import __version__
from ..bundle.files import MANIFEST, SCHEMA_VERSION, sha256_file
from ..errors import BundleError
from ..schema import load_json
from ..model.spec import EmoSpec
from ..model.tokenizer import MODEL_INPUT_NAMES, tokenizer_config
from ..units import fmt_bytes

log = logging.getLogger(__name__)


def genai_config(spec: EmoSpec, context: int) -> dict:
    """onnxruntime-genai generic decoder config."""
    return {
        "model": {
            "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else spec.eos_token_id,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": spec.eos_token_id,
            "pad_token_id": spec.pad_token_id if spec.pad_token_id is not None else spec.eos_token_id,
            "type": "decoder",
            "vocab_size": spec.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1,
                   # GroupQueryAttention (head size % 16 == 0; else the exporter's Concat attention) writes into
                   # its past buffer: genai then keeps one KV buffer of max_length (measured: same tokens on CPU)
                   "past_present_share_buffer": spec.head_dim % 16 == 0, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


# Why "llama": a static bundle's model.onnx is a causal decoder whose I/O is exactly Llama's as optimum exports it
# (input_ids, attention_mask, position_ids, past_key_values.N.key/value [B, kv_heads, P, head_dim] -> logits,
# present.N.key/value), and everything outside the MLP has Llama's semantics: pre-RMSNorm, RoPE with the same
# scaling types (linear, dynamic, yarn, llama3), GQA, optional q/k/v/o biases, SiLU, optional tied embeddings.
# optimum-onnx's ORTModelForCausalLM knows "llama" (reads num_key_value_heads; position_ids expected). The MoE
# MLP lives inside the graph and no consumer of this file needs it; it is described under "emo_edge" for humans.
# Not chosen: "olmoe", "qwen2_moe", "mixtral" (MoE, but optimum-onnx 0.1 sizes their KV cache with
# num_attention_heads, wrong under GQA); "qwen3_moe" (q/k norms EMO does not have). There is no PyTorch weight
# file, so transformers cannot build a LlamaForCausalLM from the bundle and mistake the MLP for a dense one.
HF_MODEL_TYPE = "llama"


def hf_config(spec: EmoSpec, context: int, experts_per_layer: list[int | None]) -> dict:
    """config.json: the bundle as a Hugging Face model directory (transformers' AutoConfig, optimum's
    ORTModelForCausalLM.from_pretrained(bundle) with model.onnx). `experts_per_layer`: experts kept per MoE
    layer (None for dense layers)."""
    if spec.num_heads * spec.head_dim != spec.hidden_size:
        # optimum-onnx 0.1 derives the KV head size as hidden_size / num_attention_heads for "llama"
        log.warning("config.json: head_dim %d != hidden_size / num_attention_heads (%d / %d): transformers reads "
                    "it, but optimum's ORTModelForCausalLM sizes the KV cache wrongly for this shape",
                    spec.head_dim, spec.hidden_size, spec.num_heads)
    return {
        "model_type": HF_MODEL_TYPE,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        # the model's own value (RoPE scaling is defined against it); the bundle's limit is emo_edge.context_length
        "max_position_embeddings": spec.max_position_embeddings or context,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": dict(spec.rope_scaling) if spec.rope_scaling else None,
        "attention_bias": spec.attention_bias,
        "mlp_bias": False,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "pad_token_id": spec.pad_token_id if spec.pad_token_id is not None else spec.eos_token_id,
        "emo_edge": {
            "note": "the MLP of each layer is an EMO mixture of experts restricted to the bundle's pools, inside "
                    "model.onnx; manifest.json has the expert remap",
            "context_length": context,
            "experts_per_layer": list(experts_per_layer),
            "num_experts_per_tok": spec.top_k,
        },
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def copy_tokenizer(src: Path, dst: Path, context: int) -> None:
    tok = src / "tokenizer.json"
    if not tok.is_file():
        raise BundleError(f"{tok}: the checkpoint has no tokenizer; a bundle needs one")
    shutil.copyfile(tok, dst / "tokenizer.json")
    if (src / "special_tokens_map.json").is_file():
        shutil.copyfile(src / "special_tokens_map.json", dst / "special_tokens_map.json")
    write_json(dst / "tokenizer_config.json", bundle_tokenizer_config(src / "tokenizer_config.json", context))


def bundle_tokenizer_config(path: Path, context: int) -> dict:
    """The checkpoint's tokenizer_config.json (ours when it has none) with what the bundle takes: the graph's
    `model_input_names` (no token_type_ids, so a transformers tokenizer feeds model.onnx as it is) and at most
    `context` tokens."""
    if path.exists():
        cfg = load_json(path, BundleError)
        if not isinstance(cfg, dict):
            raise BundleError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    else:
        cfg = tokenizer_config(context)
    return {**cfg, "model_input_names": list(MODEL_INPUT_NAMES), "model_max_length": context}


def write_manifest(dst: Path, body: dict) -> dict:
    files = {}
    for p in sorted(dst.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"schema_version": SCHEMA_VERSION, "emo_edge_version": __version__, **body, "files": files}
    write_json(dst / MANIFEST, manifest)
    return manifest


def report_md(report: dict) -> str:
    plan, v, t = report["plan"], report.get("verification") or {}, report["timings_s"]
    lines = [f"# emo-edge bundle: {report['name']}", "",
             f"- source checkpoint: `{report['source']['path']}` (identity `{report['source']['identity'][:16]}...`)",
             f"- pools: {', '.join(p['name'] for p in report['pools'])}; target: {report['target']}",
             f"- precision: attention {plan['precision']['attention']}, experts {plan['precision']['experts']}, "
             f"embedding {plan['precision']['embedding']}, lm_head {plan['precision']['lm_head']}, router fp32"
             + (f"; experts block size {plan['block_size']}" if {"int8", "int4"} & set(plan["precision"].values())
                else "") + f"; KV cache {plan.get('kv_cache_dtype', 'float32')}",
             f"- context: {plan['context']} tokens; budget: "
             f"{fmt_bytes(plan['budget_bytes']) if plan['budget_bytes'] else 'none'}; estimate "
             f"{fmt_bytes(plan['estimated_bytes'])}",
             f"- experts kept per MoE layer: {report['experts_per_layer']}", "", "## Plan", "", "```",
             plan.get("table", "").rstrip(), "```"]
    # the plan table above already ends with its "note: ..." lines; they are not repeated here
    lines += ["", "## Sizes", ""]
    lines += [f"- `{k}`: {fmt_bytes(b)}" for k, b in report["sizes"].items()]
    lines += ["", "## Verification", ""]
    if not v:
        lines.append("- skipped (--no-verify)")
    else:
        lines.append(f"- result: **{'PASS' if v['passed'] else 'FAIL'}** ({v['mode']}); {v['sequences']} held-out "
                     f"sequences, {v['tokens']} tokens")
        if v.get("sample"):
            lines.append(f"- sample: {v['sample']['text']}")
        for k in ("max_abs_diff", "logit_range", "tolerance", "top1_agreement", "top1_decisive", "decisive_tokens", "kl_mean", "ppl_ref", "ppl_bundle",
                  "ppl_ratio", "greedy_identical", "greedy_tokens"):
            if k in v:
                lines.append(f"- {k}: {v[k]}")
        if v.get("thresholds"):
            lines.append(f"- thresholds: {v['thresholds']}")
    lines += ["", "## Timings", ""]
    lines += [f"- {k}: {val:.2f} s" for k, val in t.items()]
    if "peak_rss_build_bytes" in report:
        lines.append(f"- export peak RSS (build stage): {fmt_bytes(report['peak_rss_build_bytes'])}")
    if report.get("peak_rss_bytes"):
        lines.append(f"- export peak RSS (whole process, VmHWM, before writing the report): "
                     f"{fmt_bytes(report['peak_rss_bytes'])}")
    if v.get("speed"):
        s = v["speed"]
        lines.append(f"- bundle speed: prefill {s['prefill_tok_s']:.1f} tok/s, decode {s['decode_tok_s']:.1f} tok/s")
    return "\n".join(lines) + "\n"
