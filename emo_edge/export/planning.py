"""The `--pools` argument of export: catalog names, built-in domains, pool files or `all` -> the per-layer union
of routed experts to keep (source numbering; None for dense layers), plus a description of each pool.

`peek_pool_layers` is the same without discovery (export --dry-run): built-in domains the catalog lacks are
listed as `PendingPool`s and counted at the size discovery would give them."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PoolError
from ..pools import BUILTIN_DOMAINS, DEFAULT_FRACTION, DEFAULT_METHOD, Catalog, compose, pool_sizes, resolve_pools
from ..pools.catalog import _looks_like_file, builtin_entry_name
from ..model.spec import EmoSpec


def expert_scores(pools) -> list[dict[int, float] | None]:
    """Per layer: each expert's best score share over the pools (from their catalog statistics), or None."""
    n = len(pools[0].layers) if pools else 0
    out: list[dict[int, float] | None] = [None] * n
    for pool in pools:
        for i, st in enumerate(pool.stats or []):
            if st and st.get("scores"):
                layer = out[i] if out[i] is not None else {}
                for e, v in st["scores"].items():
                    layer[int(e)] = max(layer.get(int(e), 0.0), float(v))
                out[i] = layer
    return out


def resolve_pool_layers(view, pools: str, spec: EmoSpec, progress=None,
                        log=None) -> tuple[list, list[dict], list | None]:
    """`progress`/`log`: shown while a built-in domain is discovered (see `resolve_pools`)."""
    names = [n.strip() for n in pools.split(",") if n.strip()]
    if not names:
        raise PoolError("--pools is empty")
    if names == ["all"]:
        layers = [None if layer.num_experts == 0 else list(layer.routed_experts) for layer in spec.layers]
        return layers, [{"name": "all"}], None
    return _union(spec, resolve_pools(view, names, progress=progress, log=log))


def _union(spec: EmoSpec, resolved) -> tuple[list, list[dict], list | None]:
    union = compose(resolved)
    layers = [None if layer.num_experts == 0 else (list(layer.routed_experts) if entry is None else list(entry))
              for layer, entry in zip(spec.layers, union)]
    scores = expert_scores(resolved)
    return (layers, [{"name": p.name, "method": p.method, "layers": p.layers} for p in resolved],
            scores if any(s is not None for s in scores) else None)


# ---- without discovery (export --dry-run) -----------------------------------------------------------------
@dataclass(frozen=True)
class PendingPool:
    """A built-in domain the catalog does not hold yet: export would discover it first (and store it)."""

    name: str  # as given in --pools
    entry: str  # the catalog entry discovery would write
    catalog: str  # the file it would be written to
    method: str
    fraction: float
    sizes: list  # per layer: routed experts discovery would keep (None for dense layers)


def peek_pools(view, names: list[str]) -> list:
    """`resolve_pools(view, names)` without discovering: each item is a Pool, or a PendingPool for a built-in
    domain the catalog lacks. Reads only catalog entries and pool files; writes nothing."""
    cat = Catalog(view)
    out: list = []
    for item in names:
        if not _looks_like_file(item) and item in BUILTIN_DOMAINS:
            entry = builtin_entry_name(item, None)
            if any(isinstance(p, PendingPool) and p.entry == entry for p in out):
                continue  # named twice: one pool (the union does not grow)
            if cat.get(entry) is None:
                out.append(PendingPool(item, entry, str(cat.path(entry)), DEFAULT_METHOD, DEFAULT_FRACTION,
                                       pool_sizes(view.spec, fraction=DEFAULT_FRACTION)))
                continue
        out.extend(resolve_pools(view, [item], catalog=cat))  # a catalog entry or a file: nothing to discover
    return out


def placeholder_union(spec: EmoSpec, known: list | None, pending: list[PendingPool]) -> list:
    """Per layer: the known pools' union grown by the pending pools' sizes, as if every pending pool were
    disjoint from the rest (an upper bound on the real union, capped at the layer's routed experts). The added
    ids are placeholders (the lowest ids not yet kept): only the counts mean something."""
    out = []
    for i, layer in enumerate(spec.layers):
        entry = None if known is None else known[i]
        if layer.num_experts == 0 or (known is not None and entry is None):
            out.append(None if layer.num_experts == 0 else list(layer.routed_experts))
            continue
        kept = set(entry or ())
        need = min(len(layer.routed_experts), len(kept) + sum(p.sizes[i] for p in pending))
        for e in layer.routed_experts:
            if len(kept) >= need:
                break
            kept.add(e)
        out.append(sorted(kept))
    return out


def peek_pool_layers(view, pools: str, spec: EmoSpec) -> tuple[list, list[dict], list | None, list[PendingPool]]:
    """`resolve_pool_layers` for a dry run: the same result when no pool needs discovery; otherwise the union
    sized by `placeholder_union`, and the pools that would be discovered first."""
    names = [n.strip() for n in pools.split(",") if n.strip()]
    if names == ["all"] or not names:
        return (*resolve_pool_layers(view, pools, spec), [])
    items = peek_pools(view, names)
    known = [p for p in items if not isinstance(p, PendingPool)]
    pending = [p for p in items if isinstance(p, PendingPool)]
    if not pending:
        return (*_union(spec, known), [])
    layers = placeholder_union(spec, compose(known) if known else None, pending)
    desc = [{"name": p.name, "method": p.method, "fraction": p.fraction, "discover": p.catalog}
            if isinstance(p, PendingPool) else {"name": p.name, "method": p.method, "layers": p.layers} for p in items]
    scores = expert_scores(known) if known else None
    return layers, desc, scores if scores and any(s is not None for s in scores) else None, pending


def pending_note(spec: EmoSpec, pending: list[PendingPool]) -> str:
    """The plan note of a dry run whose pools are not all discovered yet."""
    sizes = sorted({n for p in pending for n in p.sizes if n is not None})
    routed = sorted({len(layer.routed_experts) for layer in spec.moe_layers})
    p0 = pending[0]
    return (f"dry run: pool{'s' if len(pending) > 1 else ''} {', '.join(repr(p.name) for p in pending)} not "
            f"discovered yet: counted at the size discovery would keep ({p0.method}, fraction {p0.fraction:g}: "
            f"{'/'.join(map(str, sizes))} of {'/'.join(map(str, routed))} routed experts per MoE layer), assumed "
            f"disjoint from the other pools (an upper bound on the union); expert ids here are placeholders")
