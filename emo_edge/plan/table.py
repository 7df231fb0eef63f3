"""The export plan as the table `export` and `export --dry-run` print (and report.md holds)."""

from __future__ import annotations

from ..errors import EmoEdgeError
from .sizing import BITS
from ..units import fmt_bytes


def _layout_text(plan, component: str) -> str:
    """'b32 sym f32' for a quantized component: block size, symmetric/asymmetric, scale dtype."""
    if plan.precision[component] not in BITS:
        return ""
    lay = plan.layouts[component]
    return (f"block {lay['block_size']} {'sym' if lay['symmetric'] else 'asym'} "
            f"{'fp16' if lay['scale_dtype'] == 'float16' else 'fp32'} scales")


def format_plan(plan) -> str:
    b, p = plan.bytes, plan.precision
    kept = [len(e) for e in plan.experts if e is not None]
    imp = [len(i) for e, i in zip(plan.experts, plan.implicit) if e is not None]
    per_layer = (f"{min(kept)}-{max(kept)}" if kept and min(kept) != max(kept) else str(kept[0] if kept else 0))
    join = lambda *parts: "; ".join(x for x in parts if x)  # noqa: E731
    rows = [("attention", p["attention"], b["attention"], _layout_text(plan, "attention")),
            ("experts", p["experts"], b["experts"] + b.get("dense_mlp", 0),
             join(f"{per_layer} routed + {imp[0] if imp else 0} implicit per MoE layer", _layout_text(plan, "experts"))),
            ("router", "fp32", b["router"], "kept rows only"),
            ("embedding", p["embedding"], b["embedding"], _layout_text(plan, "embedding")),
            ("lm_head", p["lm_head"], b["lm_head"], _layout_text(plan, "lm_head")),
            ("norms", "fp32", b["norms"], ""),
            ("rope", "-", b.get("rope", 0), "cos/sin caches, in the dtype attention runs in")]
    budget = "none" if plan.budget is None else fmt_bytes(plan.budget)
    quantized = [c for c in ("experts", "attention", "lm_head", "embedding") if p[c] in BITS]
    block = ""  # block size means nothing to an all-float plan
    if quantized:
        lay = plan.layouts[quantized[0]]
        same = all(plan.layouts[c] == lay for c in quantized)
        block = (f"  block {lay['block_size']} {'symmetric' if lay['symmetric'] else 'asymmetric'}"
                 + ("" if same else f" ({quantized[0]}; per component below)"))
    lines = [f"export plan  target {plan.target}  context {plan.context}  budget {budget}{block}  "
             f"optimize {plan.optimize}",
             f"{'component':<12}{'precision':<11}{'bytes':>12}  note", "-" * 64]
    for name, prec, size, note in rows:
        lines.append(f"{name:<12}{prec:<11}{fmt_bytes(size):>12}  {note}".rstrip())
    lines.append("-" * 64)
    lines.append(f"{'weights':<12}{'(file)':<11}{fmt_bytes(b['weights']):>12}  bytes in the bundle on disk")
    lines.append(f"{'weights':<12}{'(in RAM)':<11}{fmt_bytes(b['weights_resident']):>12}  resident once loaded "
                 f"(fp16 is upcast on some targets); the budget counts this")
    lines.append(f"{'kv cache':<12}{plan.kv_cache_dtype:<11}{fmt_bytes(b['kv_cache']):>12}  {plan.context} tokens")
    try:
        from targets import get_target
        chunk = f"; prefill chunks <= {get_target(plan.target).overhead.prefill_tokens} tokens"
    except EmoEdgeError:
        chunk = ""
    lines.append(f"{'overhead':<12}{'runtime':<11}{fmt_bytes(b['overhead']):>12}  target {plan.target} formula{chunk}")
    head = "" if plan.budget is None else f"  {100 * b['total'] / plan.budget:.0f}% of budget"
    lines.append(f"{'total':<12}{'':<11}{fmt_bytes(b['total']):>12}{head}")
    sp = plan.speed
    lines.append(f"{'decode':<12}{'estimate':<11}{sp['tok_s']:>8.1f} tok/s  {fmt_bytes(sp['bytes_per_token'])} read "
                 f"per token at {sp['context_tokens']} tokens of context (target {plan.target} bandwidth model)")
    if plan.trimmed:
        lines.append(f"trimmed {len(plan.trimmed)} experts: " + ", ".join(
            f"L{t['layer']}/e{t['expert']}" for t in plan.trimmed[:12]) + (" ..." if len(plan.trimmed) > 12 else ""))
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
