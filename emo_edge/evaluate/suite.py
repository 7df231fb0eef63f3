"""The rows of an evaluation: which model, restricted how, at what precision, scored on which task sets.

- a bundle: one row, through the engine (a swappable bundle under `pool`);
- a checkpoint: the full model (fp32 reference) as the baseline row; `pool`: the model restricted to it;
  `fractions`: each task scored under its own domain's pool discovered at each fraction (the retention sweep,
  with `precision`: also through a bundle exported at that precision for each slice); `budgets`: a bundle planned
  and exported exactly as `emo-edge export --pools ... --budget B` would, then scored through the engine.
Exports go to a scratch directory that is removed afterwards.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .report import Row, score
from .scorers import EngineScorer, ReferenceScorer
from .tasks import TaskSet


@dataclass
class Suite:
    tasks: Sequence[tuple[TaskSet, str | None]]  # (task set, the domain whose pool it is scored under)
    max_tokens: int
    catalog: str | None = None
    method: str = "layerwise"
    log: Callable[[str], None] = lambda m: None

    def _score_all(self, scorer_for: Callable[[str | None], object]) -> dict:
        out = {}
        for ts, domain in self.tasks:
            self.log(f"scoring {ts.name} ({len(ts.items)} items)")
            out[ts.name] = score(scorer_for(domain), ts, self.max_tokens)
        return out

    # ---- a bundle ----------------------------------------------------------------------------------------
    def bundle_row(self, path: Path, label: str, pool: str | None = None, budget: int | None = None) -> Row:
        from ..engine import open_engine

        from ..errors import PoolError

        with open_engine(path, budget=budget) as eng:
            if eng.kind == "swappable" and pool is None:
                raise PoolError(f"{path}: a swappable bundle; name the pool to score with --pool (one of "
                                f"{', '.join(eng.pools)})")
            scores = self._score_all(lambda d: EngineScorer(eng, pool))
            kind = eng.kind
        return Row(label, f"bundle ({kind})" + (f" pool {pool}" if pool else ""), None, "-", scores, baseline=True)

    # ---- a checkpoint ------------------------------------------------------------------------------------
    def checkpoint_rows(self, view, label: str, pool: str | None = None, fractions: Sequence[float] = (),
                        budgets: Sequence[tuple[str, int]] = (), precision: str | None = None) -> list[Row]:
        total = _routed(view)
        rows = [Row(label, "full (fp32 reference)", 1.0, f"{total} per layer",
                    self._score_all(lambda d: ReferenceScorer(view)), baseline=True)]
        if pool is not None:
            from ..pools import compose, resolve_pools

            union = compose(resolve_pools(view, [pool], self.catalog))
            rows.append(Row(label, f"pool {pool}", None, _kept(union),
                            self._score_all(lambda d: ReferenceScorer(view, union))))
        pools = self._sweep(view, fractions, pool)
        for f in fractions:
            if f < 1:
                kept = _kept(next(iter(pools.values()))[f].layers)
                rows.append(Row(label, f"pool@{f:g}", f, kept,
                                self._score_all(lambda d: ReferenceScorer(view, pools[pool or d][f].layers))))
        if (precision and fractions) or budgets:
            with tempfile.TemporaryDirectory(prefix="emo-edge-eval-") as tmp:
                for f in fractions if precision else ():
                    rows.append(self._precision_row(view, label, f, pools, pool, precision, Path(tmp), total))
                for text, nbytes in budgets:
                    rows.append(self._budget_row(view, label, text, pool, Path(tmp)))
        return rows

    def _domains(self, pool: str | None) -> list[str]:
        if pool is not None:
            return [pool]
        return sorted({d for _, d in self.tasks if d is not None})

    def _sweep(self, view, fractions: Sequence[float], pool: str | None) -> dict:
        from ..commands.eval import sweep_pools

        todo = [f for f in fractions if f < 1]
        if not todo:
            return {}
        out = {}
        for d in self._domains(pool):
            out[d] = dict(zip(todo, sweep_pools(view, d, todo, None, self.method, self.catalog)))
        return out

    def _export(self, view, pools_arg: str, out: Path, budget: str | None, precision: str) -> dict:
        from ..export.pipeline import export

        self.log(f"exporting --pools {Path(pools_arg).name if '/' in pools_arg else pools_arg} "
                 f"--precision {precision}" + (f" --budget {budget}" if budget else ""))
        return export(view.root, pools_arg, budget, None, "cpu", precision, out, False, False, progress=False)

    def _precision_row(self, view, label, f, pools, pool, precision, tmp: Path, total: int) -> Row:
        scores = {}
        for ts, d in self.tasks:
            key = pool or d
            if f >= 1:
                pools_arg = "all"
            else:
                pool_file = tmp / f"{key}@{f:g}.json"
                pool_file.write_text(json.dumps({"layers": pools[key][f].layers}))
                pools_arg = str(pool_file)
            out = tmp / (f"all-{precision}" if f >= 1 else f"{key}@{f:g}-{precision}")
            if not out.exists():
                self._export(view, pools_arg, out, None, precision)
            scores.update(_bundle_scores(out, [(ts, d)], self.max_tokens, self.log))
        kept = f"{total} per layer" if f >= 1 else _kept(next(iter(pools.values()))[f].layers)
        return Row(label, f"{precision} " + ("all experts" if f >= 1 else f"pool@{f:g}"), f, kept, scores)

    def _budget_row(self, view, label, budget: str, pool: str | None, tmp: Path) -> Row:
        from ..errors import BudgetError

        names = ",".join(self._domains(pool))
        out = tmp / f"budget-{budget}"
        try:
            report = self._export(view, names, out, budget, "auto")
        except BudgetError as exc:  # an answer of the sweep: nothing fits this budget
            return Row(label, f"budget {budget} ({names})", None, "-", {}, note=f"does not fit: {exc}")
        plan = report["plan"]
        kept = [len(e) for e in plan["plan"].get("experts") or [] if e is not None]
        prec = ", ".join(f"{c} {p}" for c, p in plan["precision"].items())
        scores = _bundle_scores(out, self.tasks, self.max_tokens, self.log)
        return Row(label, f"budget {budget} ({names})", None,
                   f"{min(kept)}-{max(kept)} per layer" if kept else "-", scores, note=prec)


def _bundle_scores(path: Path, tasks, max_tokens: int, log) -> dict:
    from ..engine import open_engine

    out = {}
    with open_engine(path) as eng:
        for ts, _ in tasks:
            log(f"scoring {ts.name} on {path.name}")
            out[ts.name] = score(EngineScorer(eng), ts, max_tokens)
    return out


def _routed(view) -> int:
    counts = [len(layer.routed_experts) for layer in view.spec.layers if layer.num_experts]
    return counts[0] if counts else 0


def _kept(layers) -> str:
    kept = [len(e) for e in layers if e is not None]
    if not kept:
        return "-"
    return (f"{kept[0]}" if min(kept) == max(kept) else f"{min(kept)}-{max(kept)}") + " per layer"
