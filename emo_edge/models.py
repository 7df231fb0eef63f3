"""Where the model comes from when the user names none: `EMO_EDGE_MODEL`, then an offline Hugging Face cache
snapshot of allenai/Emo_1b14b_1T, then the embedded default model that ships in this package."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .errors import EmoEdgeError

EMBEDDED = Path(__file__).parent / "models" / "emo-tiny"
HUB_REPO = "allenai/Emo_1b14b_1T"


def hf_cache_snapshot(repo: str = HUB_REPO) -> Path | None:
    """The newest local snapshot of `repo` in the Hugging Face cache (never downloads)."""
    home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    snaps = Path(home) / f"models--{repo.replace('/', '--')}" / "snapshots"
    if not snaps.is_dir():
        return None
    found = [p for p in snaps.iterdir() if (p / "config.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_model(path: str | None, notice: bool = True) -> Path:
    if path:
        return Path(path)
    env = os.environ.get("EMO_EDGE_MODEL")
    if env:
        return Path(env)
    snap = hf_cache_snapshot()
    if snap is not None:
        return snap
    if not (EMBEDDED / "config.json").is_file():
        raise EmoEdgeError(f"no model given, EMO_EDGE_MODEL unset, no cached {HUB_REPO}, and the embedded "
                           f"default is missing at {EMBEDDED}")
    if notice:
        click.echo(f"note: no model given; using the embedded default {EMBEDDED.name} "
                   f"(set --model or EMO_EDGE_MODEL to use another)", err=True)
    return EMBEDDED
