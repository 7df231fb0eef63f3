"""The bundle's small files: genai_config.json, tokenizer files, manifest.json (sha256 of every file),
report.json and report.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import __version__
from ..bundle import MANIFEST, SCHEMA_VERSION, sha256_file
from ..errors import BundleError
from ..spec import EmoSpec
from ..tokenizer import tokenizer_config
from ..units import fmt_bytes


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
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def copy_tokenizer(src: Path, dst: Path, context: int) -> None:
    tok = src / "tokenizer.json"
    if not tok.is_file():
        raise BundleError(f"{tok}: the checkpoint has no tokenizer; a bundle needs one")
    shutil.copyfile(tok, dst / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if not (dst / "tokenizer_config.json").is_file():
        write_json(dst / "tokenizer_config.json", tokenizer_config(context))


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
             f"embedding {plan['precision']['embedding']}, lm_head {plan['precision']['lm_head']}, router fp32; "
             f"block size {plan['block_size']}",
             f"- context: {plan['context']} tokens; budget: "
             f"{fmt_bytes(plan['budget_bytes']) if plan['budget_bytes'] else 'none'}; estimate "
             f"{fmt_bytes(plan['estimated_bytes'])}",
             f"- experts kept per MoE layer: {report['experts_per_layer']}", "", "## Plan", "", "```",
             plan.get("table", "").rstrip(), "```"]
    lines += [f"- note: {n}" for n in plan.get("notes", [])]
    lines += ["", "## Sizes", ""]
    lines += [f"- `{k}`: {fmt_bytes(b)}" for k, b in report["sizes"].items()]
    lines += ["", "## Verification", ""]
    if not v:
        lines.append("- skipped (--no-verify)")
    else:
        lines.append(f"- result: **{'PASS' if v['passed'] else 'FAIL'}** ({v['mode']}); {v['sequences']} held-out "
                     f"sequences, {v['tokens']} tokens")
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
    if v.get("speed"):
        s = v["speed"]
        lines.append(f"- bundle speed: prefill {s['prefill_tok_s']:.1f} tok/s, decode {s['decode_tok_s']:.1f} tok/s")
    return "\n".join(lines) + "\n"
