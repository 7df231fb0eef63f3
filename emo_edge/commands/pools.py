"""`emo-edge pools discover|list|show|compose`: domain pools of experts (see `emo_edge/pools`)."""

from __future__ import annotations

import click

from ..errors import PoolError
from .options import model_option


def _progress(total: int, desc: str):
    """The progress bar of every pool sweep (discovery, perplexity): counts tokens."""
    from ..progress import bar

    return bar(total, desc, unit="tok", unit_scale=True)


def _note(text: str) -> None:
    from ..progress import note

    note(text)


def _view(model):
    from ..model.checkpoint import CheckpointView
    from ..model.locate import resolve_model

    return CheckpointView(resolve_model(model))


def _experts_opt(text: str | None):
    if text is None:
        return None
    from ..units import parse_int_list

    values = parse_int_list(text, "--experts", PoolError)
    return values[0] if len(values) == 1 and "," not in text else values


def _sizes_text(pool) -> str:
    ns = sorted({n for n in (pool.experts or []) if n is not None}) or \
        sorted({len(x) for x in pool.layers if x is not None})
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def _mean_cov(pool) -> str:
    covs = [s["coverage"] for s in (pool.stats or []) if s]
    return f"{sum(covs) / len(covs):.3f}" if covs else "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


SHOW_LEGEND = "\n".join([
    "kept/of   routed experts kept / routed experts in the layer",
    "coverage  share of the calibration tokens' router probability mass (routed experts) the kept experts get",
    "topk-hit  share of the calibration tokens' top-k expert choices that are kept experts",
    "+shared, +always-active  experts every token uses: always kept, not counted in 'kept'",
])


def _implicit_word(layer) -> str:
    """How `pools show` names a layer's implicit experts: shared (the last n) or always-active."""
    return "always-active" if layer.always_active else "shared"


def expert_bytes(view, layers) -> tuple[int, int]:
    """Bytes of the experts a pool keeps (implicit experts included): at the checkpoint dtype and at int4
    (block 32 with an fp16 scale per block)."""
    spec = view.spec
    per = spec.expert_params()
    dtype_bytes = 4 if view.dtype == "F32" else 2
    count = 0
    for layer, kept in zip(spec.layers, layers):
        if layer.num_experts == 0:
            continue
        count += (layer.num_experts if kept is None else len(kept) + len(layer.implicit_experts))
    return count * per * dtype_bytes, count * (per // 2 + (per // 32) * 2)


def register(cli: click.Group) -> None:
    @cli.group("pools")
    def pools():
        """Domain pools: the experts a domain uses (discover, list, show, compose)."""

    @pools.command("discover")
    @model_option
    @click.option("--name", required=True, help="Catalog name of the pool, e.g. math.")
    @click.option("--calib", "calib", multiple=True, required=True,
                  help="Calibration file (repeatable): JSONL with a \"text\" field per line, or plain UTF-8 text "
                       "with documents separated by blank lines.")
    @click.option("--experts", help="Routed experts to keep per MoE layer: N, or one N per MoE layer (N1,N2,...).")
    @click.option("--fraction", type=float, help="Share of each layer's routed experts to keep [default: 0.25].")
    @click.option("--method", type=click.Choice(["mass", "layerwise", "easy-ep"]), default="layerwise",
                  show_default=True)
    @click.option("--max-tokens", type=int, help="Truncate each document to this many tokens [default: 1024].")
    @click.option("--catalog", help="Catalog directory [default: $EMO_EDGE_HOME or ~/.cache/emo-edge, keyed by "
                                    "the checkpoint identity].")
    @click.option("--force", is_flag=True, help="Replace an existing entry of the same name.")
    def discover_cmd(model, name, calib, experts, fraction, method, max_tokens, catalog, force):
        """Discover a domain pool from calibration documents and store it in the catalog.

        Shared and always-active experts are always kept and never counted in N. Ties in the score are broken
        by expert id, so the same inputs give a byte-identical catalog entry."""
        from ..pools import Catalog, discover_pool

        view = _view(model)
        cat = Catalog(view, catalog)
        cat.path(name)  # validate the name before any work
        existing = cat.writable / f"{name}.json"
        if existing.is_file() and not force:
            raise PoolError(f"{existing}: pool '{name}' already exists (use --force to replace it)")
        pool = discover_pool(view, name, calib, method=method, experts=_experts_opt(experts), fraction=fraction,
                             max_tokens=max_tokens, progress=_progress, log=_note)
        path = cat.put(pool, force=force)
        cal = pool.calibration
        click.echo(f"pool '{name}': {method}, {_sizes_text(pool)} routed experts per layer, mean router-mass "
                   f"coverage {_mean_cov(pool)} ({cal['documents']} documents, {cal['tokens']} tokens)")
        click.echo(f"wrote {path}")

    @pools.command("list")
    @model_option
    @click.option("--catalog", help="Catalog directory.")
    def list_cmd(model, catalog):
        """List the pools of a checkpoint (shipped, cached, and built-in domains not yet discovered)."""
        from ..pools import BUILTIN_DOMAINS, Catalog

        view = _view(model)
        cat = Catalog(view, catalog)
        entries, refused = cat.entries()
        rows = [["name", "method", "experts/layer", "fraction", "coverage", "docs", "tokens", "where"]]
        for p in entries:
            cal = p.calibration or {}
            rows.append([p.name, p.method or "-", _sizes_text(p), "-" if p.fraction is None else f"{p.fraction:g}",
                         _mean_cov(p), str(cal.get("documents", "-")), str(cal.get("tokens", "-")),
                         "shipped" if p.readonly else "catalog"])
        names = {p.name for p in entries}
        for d in BUILTIN_DOMAINS:
            if d not in names:
                rows.append([d, "layerwise", "-", "0.25", "-", "-", "-", "built-in (discovered on first use)"])
        click.echo(f"checkpoint {view.identity[:16]}  catalog {cat.writable}")
        click.echo(_table(rows))
        for line in refused:
            click.echo(f"warning: {line}", err=True)

    @pools.command("show")
    @click.argument("name")
    @model_option
    @click.option("--catalog", help="Catalog directory.")
    @click.option("--json", "as_json", is_flag=True, help='Print the pool file {"layers": [...]} instead.')
    def show_cmd(name, model, catalog, as_json):
        """Show one pool: per-layer experts and statistics (a built-in domain is discovered if needed)."""
        from ..pools import resolve_pools

        view = _view(model)
        (pool,) = resolve_pools(view, [name], catalog, progress=_progress, log=_note)
        if as_json:
            click.echo(pool.pool_file_json(), nl=False)
            return
        cal = pool.calibration or {}
        click.echo(f"pool {pool.name}: method {pool.method or '-'}, from {pool.origin}")
        if cal:
            files = ", ".join(f"{f['name']} ({f['sha256'][:12]}, {f['documents']} docs, {f['tokens']} tokens)"
                              for f in cal.get("files", []))
            click.echo(f"calibration: {files}")
        rows = [["layer", "kept", "of", "coverage", "topk-hit", "experts"]]
        for i, (layer, kept) in enumerate(zip(view.spec.layers, pool.layers)):
            st = (pool.stats or [None] * len(pool.layers))[i] or {}
            if layer.num_experts == 0:
                rows.append([str(i), "-", "-", "-", "-", "dense"])
                continue
            ids = list(layer.routed_experts) if kept is None else kept
            imp = f" +{_implicit_word(layer)} {','.join(map(str, layer.implicit_experts))}" \
                if layer.implicit_experts else ""
            rows.append([str(i), str(len(ids)), str(len(layer.routed_experts)),
                         f"{st['coverage']:.3f}" if "coverage" in st else "-",
                         f"{st['topk_hit']:.3f}" if "topk_hit" in st else "-",
                         ",".join(map(str, ids)) + imp])
        click.echo(_table(rows))
        click.echo(SHOW_LEGEND)

    @pools.command("compose")
    @click.argument("names")
    @model_option
    @click.option("--catalog", help="Catalog directory.")
    def compose_cmd(names, model, catalog):
        """Per-layer union of pools (e.g. math,code): sizes, overlap (Jaccard) and the union's expert bytes."""
        from itertools import combinations

        from ..pools import compose, jaccard, resolve_pools
        from ..units import fmt_bytes

        view = _view(model)
        pools_ = resolve_pools(view, [names], catalog, progress=_progress, log=_note)
        union = compose(pools_)
        pairs = list(combinations(range(len(pools_)), 2))
        head = ["layer"] + [p.name for p in pools_] + [f"J({pools_[a].name},{pools_[b].name})" for a, b in pairs] \
            + ["union", "of"]
        rows = [head]
        jsum = [0.0] * len(pairs)
        nmoe = 0
        for i, layer in enumerate(view.spec.layers):
            if layer.num_experts == 0:
                rows.append([str(i)] + ["-"] * (len(head) - 1))
                continue
            nmoe += 1
            row = [str(i)] + [str(len(p.layers[i]) if p.layers[i] is not None else len(layer.routed_experts))
                              for p in pools_]
            for k, (a, b) in enumerate(pairs):
                j = jaccard(pools_[a].layers[i], pools_[b].layers[i])
                jsum[k] += 1.0 if j is None else j
                row.append("-" if j is None else f"{j:.2f}")
            u = union[i]
            row += [str(len(layer.routed_experts) if u is None else len(u)), str(len(layer.routed_experts))]
            rows.append(row)
        click.echo(_table(rows))
        for k, (a, b) in enumerate(pairs):
            click.echo(f"overlap {pools_[a].name}/{pools_[b].name}: mean Jaccard {jsum[k] / max(nmoe, 1):.3f} "
                       f"(0 = disjoint experts: a modular model; 1 = the same experts)")
        full_d, full_4 = expert_bytes(view, [None] * view.spec.num_layers)
        u_d, u_4 = expert_bytes(view, union)
        kept = sum(len(u) if u is not None else len(l.routed_experts)
                   for u, l in zip(union, view.spec.layers) if l.num_experts)
        total = sum(len(l.routed_experts) for l in view.spec.layers if l.num_experts)
        click.echo(f"union: {kept}/{total} routed experts ({kept / total:.1%}); expert bytes {fmt_bytes(u_d)} at "
                   f"{view.dtype} ({fmt_bytes(u_4)} at int4) vs {fmt_bytes(full_d)} ({fmt_bytes(full_4)}) for all "
                   f"experts; shared/always-active experts included")

