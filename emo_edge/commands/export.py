"""`emo-edge export [--model CKPT] --pools math,code --budget 4GB ...`: a verified ONNX bundle."""

from __future__ import annotations

from pathlib import Path

import click


def register(cli: click.Group) -> None:
    @cli.command("export")
    @click.option("--model", "model", default=None, help="Checkpoint directory (default: see resolve_model).")
    @click.option("--pools", required=True, help="Comma-separated pool names or pool JSON files, or 'all'.")
    @click.option("--budget", default=None, help="Bundle weight budget, e.g. 4GB.")
    @click.option("--context", type=int, help="Context length in tokens [default: the model's "
                  "max_position_embeddings, or 4096 when the checkpoint says -1 (unknown)].")
    @click.option("--target", default="cpu", show_default=True, help="Target (cpu, arm64).")
    @click.option("--precision", default="auto", show_default=True,
                  help="auto|fp32|fp16|int8|int4, or per component: experts=int4,attention=int8,...")
    @click.option("--out", default=None, help="Bundle directory (default ./bundles/<model>-<pools>-<precision>).")
    @click.option("--force", is_flag=True, help="Replace an existing bundle directory.")
    @click.option("--verify/--no-verify", default=True, show_default=True, help="Check against the reference.")
    @click.option("--swappable", is_flag=True, help="Backbone + per-expert shards for the pool-swapping runtime "
                  "(`emo-edge chat`): every pool's experts stored once, loaded on demand.")
    def export_cmd(model, pools, budget, context, target, precision, out, force, verify, swappable):
        """Export a verified ONNX bundle of the model restricted to the pools' experts."""
        from ..export.pipeline import export
        from ..models import resolve_model
        from ..units import fmt_bytes

        path = resolve_model(model)
        if swappable:
            from exporters.swappable import export_swappable as export
        report = export(path, pools, budget, context, target, precision, Path(out) if out else None, force, verify)
        v = report["verification"]
        precision_text = ", ".join(f"{c} {p}" for c, p in report["plan"]["precision"].items())
        click.echo(f"bundle: {report['path']} ({fmt_bytes(sum(report['sizes'].values()))}; {precision_text})")
        if v:
            extra = (f"max|diff| {v['max_abs_diff']:.2e} (tol {v['tolerance']:.2e}), greedy identical "
                     f"{v['greedy_identical']}" if v["mode"] == "fp32" else
                     f"top-1 {v['top1_agreement']:.3f} (decisive tokens: "
                     f"{'-' if v['top1_decisive'] is None else format(v['top1_decisive'], '.3f')} of "
                     f"{v['decisive_tokens']}), KL {v['kl_mean']:.4f}, ppl ratio {v['ppl_ratio']:.3f}")
            click.echo(f"verification: {'PASS' if v['passed'] else 'FAIL'}: {extra}")
        click.echo(f"export peak RSS (build): {fmt_bytes(report['peak_rss_build_bytes'])}")
