"""`emo-edge eval MODEL --tasks ...`: accuracy in points, its drop and a 95% interval, on checkpoints (the
reference, pools, fraction sweeps, precision and budget sweeps) and bundles (through the engine).

Every argument is checked before a weight is read: task files are parsed, budgets and fractions converted,
the plot's path checked; then the rows are scored (emo_edge/evaluate/suite.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import EmoEdgeError, PoolError
from ..progress import note

BUILTIN_SETS = {"math": ("equations", "arithmetic"), "code": ("code",), "equations": ("equations",),
                "arithmetic": ("arithmetic",), "prose": ("prose",), "chat": ("chat",)}



def load_task_sets(text: str, extract: str | None, limit: int | None) -> list[tuple]:
    """(TaskSet, domain) per named set or file; a file's domain is None (it is scored under --pool)."""
    from ..data import task_path
    from ..data.choice import CHOICE_FAMILIES
    from ..data.tasks import TASK_DOMAIN
    from ..evaluate.tasks import TaskSet, read_tasks

    domain_of = {**TASK_DOMAIN, **{f: f for f in CHOICE_FAMILIES}}  # a multiple-choice set is its own domain

    out, seen = [], set()
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        if item in BUILTIN_SETS:
            sets = [(read_tasks(task_path(f), name=f), domain_of[f]) for f in BUILTIN_SETS[item]]
        elif Path(item).suffix.lower() in (".jsonl", ".json", ".ndjson") or "/" in item or Path(item).exists():
            sets = [(read_tasks(item, extract), None)]
        else:
            raise EmoEdgeError(f"--tasks: '{item}' is neither a built-in task set ({', '.join(BUILTIN_SETS)}) "
                               f"nor a task file")
        for ts, domain in sets:
            if ts.name in seen:
                continue
            seen.add(ts.name)
            if limit:
                ts = TaskSet(ts.name, ts.items[:limit])
            out.append((ts, domain))
    if not out:
        raise EmoEdgeError("--tasks: no task sets named (e.g. --tasks math,code)")
    return out


def _budgets(text: str | None) -> list[tuple[str, int]]:
    from .options import parse_budget

    if not text:
        return []
    return [(b.strip(), parse_budget(b.strip())) for b in text.split(",") if b.strip()]


def run_tasks(model, tasks, extract, budgets, precision, twin, limit, max_new_tokens, as_json, pool, sweep,
              method, plot, force, catalog) -> None:
    from ..fsutil import is_bundle
    from ..model.locate import resolve_model
    from .eval import _fractions, check_plot

    sets = load_task_sets(tasks, extract, limit)
    budget_list = _budgets(budgets)
    fractions = _fractions(sweep) if sweep else []
    if plot and not fractions:
        raise PoolError("--plot needs --sweep (accuracy vs fraction of experts kept)")
    check_plot(plot, sweep, force)
    path = resolve_model(model)
    if precision is not None and precision not in ("fp32", "fp16", "int8", "int4"):
        raise EmoEdgeError(f"--precision {precision!r}: one of fp32, fp16, int8, int4")
    if precision and not fractions:
        raise EmoEdgeError("--precision needs --sweep (each slice is exported at that precision)")
    if is_bundle(path):
        for flag, value in (("--sweep", sweep), ("--budget", budgets), ("--precision", precision), ("--twin", twin)):
            if value:
                raise EmoEdgeError(f"{flag} applies to a checkpoint; {path} is a bundle (its experts and precision "
                                   f"are fixed): give the checkpoint it was exported from")
    if any(d is None for _, d in sets) and fractions and not pool:
        raise PoolError("--sweep with a task file needs --pool DOMAIN (the pool whose fractions are swept)")
    from ..evaluate.report import format_table, plot_accuracy
    from ..evaluate.suite import Suite

    suite = Suite(sets, max_new_tokens, catalog, method, log=note)
    if is_bundle(path):
        rows = [suite.bundle_row(path, path.name, pool)]
    else:
        rows = _checkpoint_rows(suite, path, pool, fractions, budget_list, precision)
        if twin:
            rows += _checkpoint_rows(suite, Path(twin), pool, fractions, budget_list, precision)
    if as_json:
        click.echo(json.dumps({"rows": [r.to_json() for r in rows]}, indent=2))
    else:
        for line in format_table(rows):
            click.echo(line)
        for r in rows:
            if r.note:
                click.echo(f"{r.model} {r.config}: {r.note}")
    if plot:
        plot_accuracy(plot, rows, force)
        note(f"wrote {plot}")


def _checkpoint_rows(suite, path: Path, pool, fractions, budgets, precision) -> list:
    from ..model.checkpoint import CheckpointView

    view = CheckpointView(path)
    try:
        label = path.name
        return suite.checkpoint_rows(view, label, pool, fractions, budgets, precision)
    finally:
        view.close()
