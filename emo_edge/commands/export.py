"""`emo-edge export [--model CKPT] --pools math,code --budget 4GB ...`: a verified ONNX bundle.

Every argument is checked first (`preflight`), with the light modules only (click, numpy, the checkpoint's
headers, the pool catalog): torch and onnx are imported by the export stages, and pools are discovered, only
after all of it passed, so a typo costs a fraction of a second, not the imports and minutes of discovery.

`--dry-run` stops after the planning stage: it prints the plan (`--json`: the plan dict a bundle's report.json
stores) and the pools that would be discovered first, discovering none, reading no weight and writing nothing.
With `--swappable` it prints the plan of the pools' union, which is what the swappable export builds (without a
budget, which `chat` applies at run time); refusing would hide the one plan that export does follow."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import BudgetError, EmoEdgeError, PoolError
from .options import BUDGET_HELP, check_pool_names, model_option, parse_budget

PRECISIONS = ("fp32", "fp16", "int8", "int4")
OPTIMIZE = ("balanced", "quality", "speed")  # emo_edge/plan/search.py OPTIMIZE (not imported: the CLI loads light)


def check_precision(precision: str, target) -> None:
    from ..plan.search import _parse_precision

    for component, p in _parse_precision(precision).items():
        if p not in target.precisions_for(component):
            raise EmoEdgeError(f"--precision: target '{target.name}' cannot store {component} at {p} "
                               f"(allowed: {', '.join(target.precisions_for(component))})")


def preflight(model, pools, budget, context, target, precision, out, force, swappable):
    """All argument checks of `export`, before any heavy import or pool discovery. Returns the model path."""
    from targets import get_target

    from ..model.checkpoint import CheckpointView
    from ..fsutil import check_target
    from ..model.locate import resolve_model
    from ..model.spec import check_context

    budget_bytes = parse_budget(budget)
    if swappable and budget_bytes is not None:
        raise BudgetError("--budget does not apply to --swappable: the bundle holds every pool and `emo-edge chat "
                          "BUNDLE --budget ...` keeps within the budget at run time; drop --budget here")
    tgt = get_target(target)
    check_precision(precision, tgt)
    if out is not None:
        check_target(out, force)
    path = resolve_model(model)
    view = CheckpointView(path)
    if context is not None:
        check_context(view.spec, context)
    names = check_pool_names(view, pools, "--pools", allow_all=True)
    if swappable and names == ["all"]:
        raise PoolError("--swappable needs named pools (e.g. --pools math,code,prose,chat)")
    if out is None and precision in PRECISIONS and not swappable:  # the default name is known before the plan
        from ..export.pipeline import default_out

        check_target(default_out(path, pools, precision), force)
    return path


def register(cli: click.Group) -> None:
    @cli.command("export")
    @model_option
    @click.option("--pools", required=True, help="Comma-separated pool names or pool JSON files, or 'all'.")
    @click.option("--budget", default=None, help=BUDGET_HELP + " The planner picks precisions (and trims "
                  "lowest-scored experts if it must) so that the bundle fits.")
    @click.option("--context", type=click.IntRange(min=8), help="Context length in tokens, at least 8 [default: "
                  "the model's max_position_embeddings, or 4096 when the checkpoint says -1 (unknown)].")
    @click.option("--target", default="cpu", show_default=True, help="Target (cpu, arm64).")
    @click.option("--precision", default="auto", show_default=True,
                  help="auto|fp32|fp16|int8|int4, or per component: experts=int4,attention=int8,...")
    @click.option("--optimize", type=click.Choice(OPTIMIZE), default="balanced", show_default=True,
                  help="How --precision auto chooses among the plans that fit: balanced (the most accurate whose "
                  "estimated decode speed is at least the target's balanced_fraction of the fastest's, 95% on cpu, "
                  "or fast enough anyway), quality (the most accurate), speed (the fastest). The plan shows the "
                  "estimate.")
    @click.option("--out", default=None, help="Bundle directory (default ./bundles/<model>-<pools>-<precision>).")
    @click.option("--force", is_flag=True, help="Replace an existing bundle directory (only an emo-edge bundle).")
    @click.option("--verify/--no-verify", default=True, show_default=True, help="Check against the reference.")
    @click.option("--swappable", is_flag=True, help="Backbone + per-expert shards for the pool-swapping runtime "
                  "(`emo-edge chat`): every pool's experts stored once, loaded on demand. Takes no --budget (give "
                  "it to `chat`).")
    @click.option("--dry-run", is_flag=True, help="Print the plan (and the pools that would be discovered first) "
                  "and write nothing: no pool is discovered, no weight read.")
    @click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON on stdout (the "
                  "dict a bundle's report.json stores under 'plan'), nothing else.")
    def export_cmd(model, pools, budget, context, target, precision, optimize, out, force, verify, swappable,
                   dry_run, as_json):
        """Export a verified ONNX bundle of the model restricted to the pools' experts."""
        if as_json and not dry_run:
            raise EmoEdgeError("--json needs --dry-run (an export prints its summary; the bundle's report.json "
                               "holds the plan)")
        path = preflight(model, pools, budget, context, target, precision, out, force, swappable)
        if dry_run:
            return print_dry_run(path, pools, budget, context, target, precision, out, force, swappable, as_json,
                                 optimize)
        from ..export.pipeline import export, rss_peak

        if swappable:
            from exporters.swappable import export_swappable as export
        report = export(path, pools, budget, context, target, precision, Path(out) if out is not None else None,
                        force, verify, optimize=optimize)
        for line in summary_lines(report):
            click.echo(line)
        click.echo(f"export peak RSS: {fmt_peak(report.get('peak_rss_build_bytes'))} after the build stage, "
                   f"{fmt_peak(rss_peak())} for the whole process (VmHWM)")


def fmt_peak(n: int | None) -> str:
    from ..units import fmt_bytes

    return "-" if n is None else fmt_bytes(n)


def _decisive_text(v: dict) -> str:
    """The top-1 check is made on decisive tokens only (the reference's top-1 leads its runner-up by a margin);
    say so, and say when there were none (near-flat logits, as a random synthetic model has)."""
    from ..export.verify import DECISIVE_MARGIN

    if not v["decisive_tokens"]:
        return (f"not checked: no decisive token, i.e. none where the reference's top-1 probability leads the "
                f"runner-up by {DECISIVE_MARGIN:g}; KL and perplexity decide")
    return (f"{v['top1_decisive']:.3f} on the {v['decisive_tokens']} decisive tokens, where the reference's top-1 "
            f"leads by {DECISIVE_MARGIN:g}")


def summary_lines(report: dict) -> list[str]:
    from ..units import fmt_bytes

    v = report["verification"]
    precision_text = ", ".join(f"{c} {p}" for c, p in report["plan"]["precision"].items())
    lines = [f"bundle: {report['path']} ({fmt_bytes(sum(report['sizes'].values()))}; {precision_text})"]
    if v:
        extra = (f"max|diff| {v['max_abs_diff']:.2e} (tol {v['tolerance']:.2e}), greedy identical "
                 f"{v['greedy_identical']}" if v["mode"] == "fp32" else
                 f"top-1 {v['top1_agreement']:.3f} ({_decisive_text(v)}), KL {v['kl_mean']:.4f}, "
                 f"ppl ratio {v['ppl_ratio']:.3f}")
        lines.append(f"verification: {'PASS' if v['passed'] else 'FAIL'}: {extra}")
        if v.get("sample"):
            lines.append(f"verification sample: {v['sample']['text']}")
    return lines


def print_dry_run(path, pools, budget, context, target, precision, out, force, swappable, as_json,
                  optimize="balanced") -> None:
    """`export --dry-run [--json]`: the plan on stdout; the pools that would be discovered first on stderr with
    --json (stdout holds the JSON alone), on stdout otherwise."""
    import json

    from .. import progress
    from ..export.pipeline import dry_run, plan_summary

    planned, dest = dry_run(path, pools, budget, context, target, precision,
                            Path(out) if out is not None else None, force, swappable, optimize)
    if as_json:
        for line in pending_lines(planned.pending):
            progress.note(line)
        click.echo(json.dumps(plan_summary(planned.plan), indent=2, sort_keys=True))
        return
    for line in dry_run_lines(planned, dest, swappable):
        click.echo(line)


def pending_lines(pending) -> list[str]:
    if not pending:
        return []
    lines = ["pools to discover first (not in the catalog yet: an export discovers and stores them, a dry run "
             "only counts them):"]
    for p in pending:
        sizes = sorted({n for n in p.sizes if n is not None})
        lines.append(f"  {p.name}: built-in domain, {p.method} at fraction {p.fraction:g} -> "
                     f"{'/'.join(map(str, sizes))} routed experts per MoE layer; would be stored as {p.catalog}")
    return lines


def dry_run_lines(planned, dest: Path, swappable: bool) -> list[str]:
    from ..plan.search import format_plan

    plan = planned.plan
    lines = ["dry run: no pool discovered, no weight read, nothing written"] + pending_lines(planned.pending)
    if swappable:
        lines.append("--swappable: the plan of the pools' union, which the swappable bundle stores once (no budget "
                     "here: `emo-edge chat BUNDLE --budget ...` keeps within one at run time)")
    lines.append(format_plan(plan))
    kept = [len(e) for e in plan.experts if e is not None]
    lines.append(f"experts kept per MoE layer: {' '.join(map(str, kept)) or '-'} ({len(plan.trimmed)} trimmed)")
    lines.append(f"bundle: would be written to {dest}")
    return lines
