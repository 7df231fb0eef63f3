"""`emo-edge inspect CKPT`: shape, routing, parameter counts and sizes, without reading any weight."""

from __future__ import annotations

import click

from ..model.checkpoint import CheckpointView
from ..model.locate import resolve_model
from ..units import fmt_bytes, fmt_count
from .options import model_option

# bytes per parameter of a block-quantized matrix (block 32, one fp16 scale per block)
INT8_BPP = 1 + 2 / 32
INT4_BPP = 0.5 + 2 / 32


def inspect_lines(view: CheckpointView) -> list[str]:
    spec = view.spec
    counts = spec.param_counts()
    moe = spec.moe_layers
    experts = sorted({layer.num_experts for layer in moe})
    small = counts["norms"] + counts["routers"]  # kept in fp32 by every plan
    matrices = counts["total"] - small
    lines = [
        f"checkpoint   {view.root}",
        f"identity     {view.identity[:16]}",
        f"layers       {spec.num_layers} ({len(moe)} MoE, {spec.num_layers - len(moe)} dense)",
        f"hidden       {spec.hidden_size}   heads {spec.num_heads} (kv {spec.num_kv_heads}, head_dim {spec.head_dim})",
        f"vocab        {spec.vocab_size}   tied head: {spec.tie_word_embeddings}",
        f"experts      {'/'.join(map(str, experts)) or '-'} per layer, intermediate {spec.intermediate_size}, "
        f"top-{spec.top_k} per token",
        f"routing      {spec.routing_variant()}" + (f" (shared: last {moe[0].num_shared})" if moe and moe[0].num_shared
                                                    and moe[0].routing == 'shared' else "")
        + (f" (always-active: {list(moe[0].always_active)})" if moe and moe[0].always_active else "")
        + (", norm_topk_prob" if spec.norm_topk_prob else ""),
        f"rope         theta {spec.rope_theta:g}, scaling {spec.rope_type}, max positions "
        f"{spec.max_position_embeddings or 'unknown (-1)'}",
        f"parameters   total {fmt_count(counts['total'])} ({counts['total']:,})",
        f"             active per token {fmt_count(counts['active'])} ({counts['active']:,})",
        f"             per expert {fmt_count(counts['per_expert'])}; experts {fmt_count(counts['experts'])}, "
        f"attention {fmt_count(counts['attention'])}, embedding {fmt_count(counts['embedding'])}, "
        f"head {fmt_count(counts['lm_head'])}",
        f"dtype        {view.dtype}",
        f"on disk      {fmt_bytes(view.bytes_on_disk())}",
        f"estimated    int8 {fmt_bytes(matrices * INT8_BPP + small * 4)}, "
        f"int4 {fmt_bytes(matrices * INT4_BPP + small * 4)} (block 32, fp16 scales)",
    ]
    return lines


def bundle_lines(path) -> list[str]:
    """What a bundle is, from its validated manifest: kind, source, pools, precision, context, bytes."""
    from ..bundle.schema import read_manifest

    m = read_manifest(path)
    files = m.get("files", {})
    total = sum(e.get("bytes", 0) for e in files.values() if isinstance(e, dict))
    pools = [p.get("name") for p in m.get("pools", []) if isinstance(p, dict)]
    if m.get("kind") == "swappable":
        pools = sorted((m.get("swappable") or {}).get("pools", {}))
    src = m.get("source") or {}
    prec = m.get("precision")
    return [f"bundle       {path} ({m.get('kind') or 'static'})",
            f"source       {src.get('path', '-') if isinstance(src, dict) else '-'}",
            f"pools        {', '.join(map(str, pools)) or '-'}",
            f"precision    {', '.join(f'{k} {v}' for k, v in prec.items()) if isinstance(prec, dict) else '-'}",
            f"context      {m.get('context_length') or '-'}",
            f"files        {len(files)}, {fmt_bytes(total)}",
            "(a bundle: `emo-edge run`/`chat`/`serve` run it; its report.json holds the plan and verification)"]


def register(cli: click.Group) -> None:
    @cli.command("inspect")
    @model_option
    def inspect_cmd(model: str | None) -> None:
        """Print a checkpoint's shape, routing variant, parameter counts and sizes (or what a bundle holds)."""
        import os

        path = resolve_model(model)
        if os.path.lexists(path / "manifest.json"):
            click.echo("\n".join(bundle_lines(path)))
            return
        view = CheckpointView(path)
        click.echo("\n".join(inspect_lines(view)))
