"""`emo-edge logits CKPT --ids 5,17,99 [--pool POOL.json] --out logits.npy`: reference logits (tokens, vocab)."""

from __future__ import annotations

import io
from pathlib import Path

import click
import numpy as np

from ..errors import EmoEdgeError
from ..fsutil import atomic_write
from ..units import parse_int_list


def parse_ids(text: str) -> list[int]:
    return parse_int_list(text, "--ids")


def checkpoint_logits(path: Path, ids: list[int], pool_file: str | None, text: str | None) -> np.ndarray:
    from ..checkpoint import CheckpointView
    from ..poolfile import read_pool_file
    from ..reference import Reference
    from ..tokenizer import load_tokenizer

    view = CheckpointView(path)
    pool = read_pool_file(pool_file, view.spec) if pool_file else None
    if text is not None:
        ids = load_tokenizer(path).encode(text)
    big = view.spec.vocab_size * view.spec.hidden_size * view.spec.num_layers > 2e9
    model = Reference(view, pool=pool, streaming=big)
    return model.forward([ids])[0].numpy().astype(np.float32)


def write_npy(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, buf.getvalue())


def register(cli: click.Group) -> None:
    @cli.command("logits")
    @click.argument("model")
    @click.option("--ids", help="Comma-separated token ids.")
    @click.option("--text", help="Text to tokenize instead of --ids.")
    @click.option("--pool", "pool_file", help='Pool file {"layers": [[ids] or null, ...]} (source numbering).')
    @click.option("--out", required=True, help="Output .npy: float32 (tokens, vocab).")
    def logits_cmd(model, ids, text, pool_file, out):
        """Write the logits of a checkpoint (reference model) or of an exported bundle."""
        if (ids is None) == (text is None):
            raise EmoEdgeError("give exactly one of --ids or --text")
        path = Path(model)
        id_list = parse_ids(ids) if ids is not None else []
        if (path / "manifest.json").is_file():
            from ..bundle_logits import bundle_logits  # device side: no torch
            logits = bundle_logits(path, id_list, pool_file, text)
        else:
            logits = checkpoint_logits(path, id_list, pool_file, text)
        write_npy(out, logits)
        click.echo(f"wrote {out}: logits {tuple(logits.shape)}")
