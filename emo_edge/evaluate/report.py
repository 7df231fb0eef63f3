"""Scoring a task set through a scorer, and the accuracy table: points, the drop from a baseline row, and a 95%
Wilson interval (the sets are small: the interval says how much a difference can be noise)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .tasks import TaskSet, is_correct

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n (as fractions)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


@dataclass
class Score:
    task: str
    n: int
    correct: int
    samples: list = field(default_factory=list)  # the first few (prompt, completion, right?) for inspection

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_json(self) -> dict:
        lo, hi = wilson(self.correct, self.n)
        return {"task": self.task, "n": self.n, "correct": self.correct, "accuracy": self.accuracy,
                "ci95": [lo, hi], "samples": self.samples}


def score(scorer, tasks: TaskSet, max_tokens: int, keep_samples: int = 3) -> Score:
    items = tasks.items
    if tasks.kind == "exact":
        completions = scorer.complete([i.prompt for i in items], [i.extract for i in items], max_tokens)
        right = [is_correct(i, c) for i, c in zip(items, completions)]
        samples = [[i.prompt, c, r] for i, c, r in zip(items, completions, right)][:keep_samples]
    else:
        pairs = [(i.prompt, c) for i in items for c in i.choices]
        flat = scorer.loglik(pairs)
        right, samples, at = [], [], 0
        for i in items:
            s = flat[at:at + len(i.choices)]
            at += len(i.choices)
            best = max(range(len(s)), key=lambda j: (s[j], -j))
            right.append(best == i.label)
            if len(samples) < keep_samples:
                samples.append([i.prompt, i.choices[best], best == i.label])
    return Score(tasks.name, len(items), sum(right), samples)


@dataclass
class Row:
    model: str  # which checkpoint (e.g. emo-tiny, its twin)
    config: str  # full, pool@0.25, int4 pool@0.25, bundle, budget 2GB, ...
    fraction: float | None  # routed experts kept (1.0 = all), when the row is a pool slice
    experts: str  # e.g. "8/31 per layer"
    scores: dict[str, Score]
    baseline: bool = False  # the row the drops are measured from (for its model)
    note: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["scores"] = {k: v.to_json() for k, v in self.scores.items()}
        return d


def drops(rows: list[Row]) -> dict[int, dict[str, float]]:
    """Per row index: accuracy drop in points from its model's baseline row, per task."""
    base = {r.model: r for r in rows if r.baseline}
    out = {}
    for i, r in enumerate(rows):
        b = base.get(r.model)
        if b is None:
            continue
        out[i] = {t: 100 * (b.scores[t].accuracy - s.accuracy) for t, s in r.scores.items() if t in b.scores}
    return out


def format_table(rows: list[Row]) -> list[str]:
    if not rows:
        return []
    tasks = list(rows[0].scores)
    d = drops(rows)
    head = ["model", "config", "experts"] + [f"{t} (n={rows[0].scores[t].n})" for t in tasks]
    table = [head]
    for i, r in enumerate(rows):
        cells = [r.model, r.config, r.experts]
        for t in tasks:
            s = r.scores.get(t)
            if s is None:
                cells.append("-")
                continue
            lo, hi = wilson(s.correct, s.n)
            cell = f"{100 * s.accuracy:5.1f} [{100 * lo:4.1f}-{100 * hi:5.1f}]"
            if i in d and not r.baseline:
                cell += f" {-d[i][t] + 0.0:+5.1f}"
            cells.append(cell)
        table.append(cells)
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("accuracy % [95% Wilson interval] and the change in points from the model's first row; greedy "
                 "decoding; n items per set")
    return lines


def plot_accuracy(path: str, rows: list[Row], force: bool = False) -> None:
    """Accuracy vs fraction of routed experts kept: a panel per task set, a line per model and precision."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fsutil import atomic_write

    series: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for r in rows:
        if r.fraction is None:
            continue
        kind = "int4" if r.config.startswith("int4") else "fp32"
        for t, s in r.scores.items():
            series.setdefault((t, r.model, kind), []).append((r.fraction, 100 * s.accuracy))
    tasks = list(dict.fromkeys(k[0] for k in series))
    models = list(dict.fromkeys(k[1] for k in series))
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(3.6 * max(1, len(tasks)), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, model, kind), pts in series.items():
            if t != task:
                continue
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o" if kind == "fp32" else "x", ls="-" if kind == "fp32" else "--",
                    color=colors[models.index(model) % len(colors)], label=f"{model} ({kind})")
        ax.set_xscale("log", base=2)
        xs = sorted({x for (t, _, _), pts in series.items() if t == task for x, _ in pts})
        ax.set_xticks(xs, [f"{100 * x:g}%" for x in xs])
        ax.set_ylim(0, 100)
        ax.set_title(task)
        ax.set_xlabel("routed experts kept (domain pool)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue(), force)
