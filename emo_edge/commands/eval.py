"""`emo-edge eval MODEL --tasks math,code [--sweep 1,0.5,0.25,0.125] [--budget 1GB,2GB] ...`: accuracy in points
(task files, emo_edge/evaluate); `emo-edge eval CKPT --pool math [--text FILE] [--sweep ...]`: perplexity of the
full model and of the pool-restricted model on held-out text (streaming, layer by layer)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..errors import PoolError
from ..progress import note
from .options import POSITIVE, check_pool_names, model_option


def _fractions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PoolError(f"--sweep '{text}' must be comma-separated fractions, e.g. 0.5,0.25,0.125") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise PoolError(f"--sweep '{text}': fractions must be in (0, 1]")
    return values


def check_plot(plot: str | None, sweep: str | None, force: bool = False) -> None:
    """--plot is checked before the sweep runs: it needs --sweep, an existing directory, and --force to replace
    a file."""
    if not plot:
        return
    if not sweep:
        raise PoolError("--plot needs --sweep")
    parent = Path(plot).parent
    if not parent.is_dir():
        raise PoolError(f"--plot {plot}: directory {parent} does not exist")
    if Path(plot).is_dir():
        raise PoolError(f"--plot {plot}: is a directory; give a .png file name")
    if Path(plot).exists() and not force:
        raise PoolError(f"--plot {plot}: already exists (use --force to replace it)")


def sweep_pools(view, name: str, fractions: list[float], calib, method: str, catalog) -> list:
    """The pools of a retention sweep, one per fraction. They are helpers of this measurement: discovered in
    memory and never stored in the catalog (only an entry the catalog already has is reused)."""
    from ..pools import Catalog, discover_pool
    from ..pools.catalog import builtin_calib, builtin_entry_name
    from .pools import _progress

    cat = Catalog(view, catalog)
    pools = []
    for f in fractions:
        entry = builtin_entry_name(name, f, method)
        existing = None if calib else cat.get(entry)
        if existing is not None:
            pools.append(existing)
            continue
        files = list(calib) if calib else [builtin_calib(name)]
        pools.append(discover_pool(view, f"{name}@{f:g}", files, method=method, fraction=f, progress=_progress,
                                   log=lambda m: note(m + " (for this sweep only; not stored in the catalog)")))
    return pools


def _ppl(nll: float, n: int, kl: float = 0.0) -> float:
    return math.exp(nll / n) if n else float("nan")


def plot_retention(path: str, rows: list[tuple[float, float]], title: str, force: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from ..fsutil import atomic_write

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs, ys = zip(*sorted(rows))
    ax.plot(xs, ys, marker="o")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fraction of routed experts kept")
    ax.set_ylabel("perplexity ratio (pool / full)")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue(), force)


def register(cli: click.Group) -> None:
    @cli.command("eval")
    @model_option
    @click.option("--tasks", help="Accuracy mode: built-in task sets (math = equations + arithmetic, code; or "
                  "equations, arithmetic) or task files (JSONL: prompt + answer [+ extract], or prompt + choices + "
                  "label), comma-separated. Works on checkpoints and bundles.")
    @click.option("--extract", type=click.Choice(["last_x", "last_int", "first_line"]),
                  help="With --tasks: the extraction rule of exact-answer lines that name none.")
    @click.option("--budget", "budgets", help="With --tasks on a checkpoint: comma-separated budgets (e.g. "
                  "1GB,2GB,4GB); each is planned and exported exactly as `export --budget` would and scored "
                  "through the engine.")
    @click.option("--precision", help="With --tasks --sweep on a checkpoint: also score each slice exported at "
                  "this precision (e.g. int4) through the engine.")
    @click.option("--twin", help="With --tasks on a checkpoint: a second checkpoint (e.g. a standard MoE) given "
                  "the same rows, for comparison.")
    @click.option("--limit", type=POSITIVE, help="With --tasks: the first N items of each task set.")
    @click.option("--max-new-tokens", type=POSITIVE, default=160, show_default=True,
                  help="With --tasks: the most tokens a completion may take.")
    @click.option("--json", "as_json", is_flag=True, help="With --tasks: print the rows as JSON.")
    @click.option("--pool", "pool_names",
                  help="Pool(s): catalog names, built-in domains (math, code, prose, chat) or pool .json files; "
                       "a comma-separated list means their union. Required for perplexity; with --tasks the "
                       "model is also scored restricted to it (a swappable bundle: the pool it serves).")
    @click.option("--text", "text_files", multiple=True,
                  help="Held-out text (JSONL or blank-line-separated plain text); default for a built-in domain: "
                       "its built-in held-out set.")
    @click.option("--max-docs", type=POSITIVE, default=32, show_default=True, help="Held-out documents per file.")
    @click.option("--max-tokens", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per document.")
    @click.option("--sweep", help="Fractions to discover the pool at, e.g. 0.5,0.25,0.125 (retention table).")
    @click.option("--calib", multiple=True, help="Calibration files for --sweep (default: the built-in domain's).")
    @click.option("--method", type=click.Choice(["mass", "layerwise", "easy-ep"]), default="layerwise",
                  show_default=True, help="Discovery method for --sweep.")
    @click.option("--plot", help="With --sweep: draw the retention curve to this PNG.")
    @click.option("--force", is_flag=True, help="Replace the --plot file if it exists.")
    @click.option("--catalog", help="Catalog directory.")
    def eval_cmd(model, tasks, extract, budgets, precision, twin, limit, max_new_tokens, as_json, pool_names,
                 text_files, max_docs, max_tokens, sweep, calib, method, plot, force, catalog):
        """Accuracy in points on task sets (--tasks), or perplexity of the full vs the pool-restricted model on
        held-out text, and their ratio."""
        from ..model.checkpoint import CheckpointView
        from ..model.locate import resolve_model
        from ..pools import BUILTIN_DOMAINS

        if tasks:
            from .eval_tasks import run_tasks

            for flag, value in (("--text", text_files), ("--calib", calib)):
                if value:
                    raise PoolError(f"{flag} belongs to perplexity mode; with --tasks the task files are the text "
                                    f"(and --sweep discovers pools from the built-in calibration)")

            return run_tasks(model, tasks, extract, budgets, precision, twin, limit, max_new_tokens, as_json,
                             pool_names, sweep, method, plot, force, catalog)
        for flag, value in (("--extract", extract), ("--budget", budgets), ("--precision", precision),
                            ("--twin", twin), ("--limit", limit), ("--json", as_json)):
            if value:
                raise PoolError(f"{flag} belongs to accuracy mode: give --tasks (e.g. --tasks math,code)")
        if not pool_names:
            raise PoolError("give --pool NAME (perplexity mode) or --tasks SETS (accuracy mode)")
        check_plot(plot, sweep, force)
        fractions = _fractions(sweep) if sweep else None
        view = CheckpointView(resolve_model(model))
        if sweep and calib:  # the name only labels the pools rediscovered from --calib
            from ..pools.catalog import check_name

            names = [check_name(n.strip()) for n in pool_names.split(",") if n.strip()]
        else:  # unknown names fail before any work
            names = check_pool_names(view, pool_names, "--pool", catalog)
        files = list(text_files)
        if not files:
            domains = [n for n in names if n in BUILTIN_DOMAINS]
            if not domains:
                raise PoolError("give --text FILE (held-out text); only built-in domains have a default")
            from ..pools.catalog import BUILTIN_CALIB
            files = [str(BUILTIN_CALIB.parent / "heldout" / f"{d}.jsonl") for d in domains]
        if sweep:
            if len(names) != 1:
                raise PoolError("--sweep takes one pool name (a built-in domain, or any name with --calib)")
            if not calib and names[0] not in BUILTIN_DOMAINS:
                raise PoolError(f"--sweep: '{names[0]}' is not a built-in domain; give --calib FILE to "
                                f"rediscover it")
        from ..pools import compose, resolve_pools
        from ..pools.calib import load_calibration
        from ..pools.discover import doc_nll
        from ..model.reference import Reference
        from ..model.tokenizer import load_tokenizer
        from .pools import _progress

        held = load_calibration(files, load_tokenizer(view.root), max_tokens=max_tokens, max_docs=max_docs)
        ref = Reference(view, streaming=True)

        if not sweep:
            pools = resolve_pools(view, names, catalog, progress=_progress, log=note)
            union = compose(pools)
            (full, pooled) = doc_nll(ref, held.docs, [None, union], progress=_progress)
            pf, pp = _ppl(*full), _ppl(*pooled)
            kept = sum(len(u) for u in union if u is not None)
            total = sum(len(l.routed_experts) for l in view.spec.layers if l.num_experts)
            click.echo(f"held-out: {', '.join(Path(f).name for f in files)} ({len(held.docs)} documents, "
                       f"{full[1]} predicted tokens)")
            click.echo(f"full model         ppl {pf:10.3f}")
            click.echo(f"pool {pool_names:<13} ppl {pp:10.3f}  ({kept}/{total} routed experts)")
            click.echo(f"ratio pool/full    {pp / pf:.4f}   (mean KL full||pool {pooled[2]:.5f} nats/token)")
            return

        name = names[0]
        pools = sweep_pools(view, name, fractions, calib, method, catalog)
        results = doc_nll(ref, held.docs, [None] + [p.layers for p in pools], progress=_progress)
        pf = _ppl(*results[0])
        total = sum(len(l.routed_experts) for l in view.spec.layers if l.num_experts)
        click.echo(f"retention of '{name}' ({method}) on {', '.join(Path(f).name for f in files)} "
                   f"({len(held.docs)} documents, {results[0][1]} predicted tokens)")
        rows = [["fraction", "experts kept", "coverage", "ppl", "ratio", "KL/token"],
                ["1 (full)", f"{total}/{total}", "1.000", f"{pf:.3f}", "1.0000", "0"]]
        curve = [(1.0, 1.0)]
        for f, p, r in zip(fractions, pools, results[1:]):
            kept = sum(len(u) for u in p.layers if u is not None)
            covs = [s["coverage"] for s in p.stats if s]
            pp = _ppl(*r)
            rows.append([f"{f:g}", f"{kept}/{total}", f"{sum(covs) / len(covs):.3f}", f"{pp:.3f}",
                         f"{pp / pf:.4f}", f"{r[2]:.5f}"])
            curve.append((f, pp / pf))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            click.echo("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if plot:
            plot_retention(plot, curve, f"{name}: quality vs experts kept ({method})", force)
            click.echo(f"wrote {plot}")
