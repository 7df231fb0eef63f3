"""`emo-edge logits CKPT --ids 5,17,99 [--pool POOL.json] --out logits.npy`: reference logits (tokens, vocab)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import click
import numpy as np

from ..errors import BundleError, EmoEdgeError, PoolError
from ..fsutil import atomic_write
from ..progress import note
from ..units import parse_int_list
from .options import TEXT, model_option


def parse_ids(text: str) -> list[int]:
    return parse_int_list(text, "--ids")


def bundle_logits(path: Path, ids: list[int], pool: str | None, text: str | None) -> np.ndarray:
    """Logits (S, V) of `ids` (or `text`) from a bundle. Static: `pool` is a pool file that must name the
    bundle's experts. Swappable: a catalog name or pool file, made resident first (equal to the static bundle
    of that pool)."""
    from ..bundle.files import pool_matches
    from ..engine import open_engine

    with open_engine(path) as eng:
        if eng.kind == "swappable":
            if pool is None:
                raise PoolError(f"{path} is a swappable bundle: give --pool (one of {', '.join(eng.pools)}, or a "
                                f"pool JSON file)")
        elif pool:
            pool_matches(eng.manifest, pool)
            pool = None
        if text is not None:
            ids = eng.encode(text)
        if not ids:
            raise BundleError("no tokens to run")
        return eng.logits(ids, pool=pool)


def checkpoint_logits(path: Path, ids: list[int], pool: str | None, text: str | None) -> np.ndarray:
    from ..model.checkpoint import CheckpointView
    from ..pools import compose, resolve_pools
    from ..model.reference import Reference
    from ..model.tokenizer import load_tokenizer

    view = CheckpointView(path)
    layers = compose(resolve_pools(view, [pool], log=note)) if pool else None
    if text is not None:
        ids = load_tokenizer(path).encode(text)
    big = view.spec.vocab_size * view.spec.hidden_size * view.spec.num_layers > 2e9
    model = Reference(view, pool=layers, streaming=big)
    return model.forward([ids])[0].numpy().astype(np.float32)


def static_bundle_pool(path: Path, pool: str) -> str | None:
    """A --pool NAME given with a static bundle: allowed only if the bundle was exported for exactly that pool
    (a static bundle cannot drop experts); returns None then. Pool files are left to the bundle's own check."""
    from ..pools.catalog import _looks_like_file

    if _looks_like_file(pool):
        return pool
    from ..schema import load_json

    manifest = load_json(path / "manifest.json", BundleError, "no manifest")
    pools = manifest.get("pools") if isinstance(manifest, dict) else None
    names = [p.get("name") for p in (pools if isinstance(pools, list) else []) if isinstance(p, dict)]
    if names == [pool]:
        return None
    if pool in names:
        raise BundleError(f"{path}: the bundle holds the union of pools {', '.join(names)}; it cannot be "
                          f"restricted to '{pool}' (export a bundle for that pool alone)")
    raise BundleError(f"{path}: the bundle was exported for pools {', '.join(map(str, names)) or '-'}, not "
                      f"'{pool}'")


def write_npy(path: str, array: np.ndarray, force: bool = False) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, buf.getvalue(), force)


def register(cli: click.Group) -> None:
    @cli.command("logits")
    @model_option
    @click.option("--ids", help="Comma-separated token ids.")
    @click.option("--text", type=TEXT, help="Text to tokenize instead of --ids.")
    @click.option("--pool", "pool", help="Restrict routing to a pool: a catalog name or built-in domain (math, code, "
                  "...; comma-separated: their union), or a pool file {\"layers\": [[ids] or null, ...]} (source "
                  "numbering).")
    @click.option("--out", required=True, help="Output .npy: float32 (tokens, vocab).")
    @click.option("--force", is_flag=True, help="Replace --out if it exists.")
    def logits_cmd(model, ids, text, pool, out, force):
        """Write the logits of a checkpoint (reference model) or of an exported bundle (MODEL or --model: a
        checkpoint or bundle directory)."""
        from ..model.locate import resolve_model

        if (ids is None) == (text is None):
            raise EmoEdgeError("give exactly one of --ids or --text")
        id_list = parse_ids(ids) if ids is not None else []
        if not Path(out).parent.is_dir():
            raise EmoEdgeError(f"--out {out}: directory {Path(out).parent} does not exist")
        if os.path.lexists(out) and not force:
            raise EmoEdgeError(f"--out {out}: already exists (use --force to replace it)")
        path = resolve_model(model)
        if os.path.lexists(path / "manifest.json"):  # a bundle (its loader says what is wrong with the manifest)
            from ..engine import is_swappable

            if pool and not is_swappable(path):
                pool = static_bundle_pool(path, pool)
            logits = bundle_logits(path, id_list, pool, text)
        else:
            logits = checkpoint_logits(path, id_list, pool, text)
        write_npy(out, logits, force)
        click.echo(f"wrote {out}: logits {tuple(logits.shape)}")
