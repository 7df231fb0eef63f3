"""Where the model comes from when the user names none: `EMO_EDGE_MODEL`, then an offline Hugging Face cache
snapshot of allenai/Emo_1b14b_1T, then the embedded default model that ships in this package.

Also where a checkpoint's own files may live: inside its directory, or, for a snapshot in the Hugging Face hub
cache (`models--org--name/snapshots/<rev>/`, whose files are symlinks into `../../blobs/`), inside that same
`models--org--name` cache entry.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import EmoEdgeError
from ..schema import confined

EMBEDDED = Path(__file__).resolve().parents[1] / "models" / "emo-tiny"
HUB_REPO = "allenai/Emo_1b14b_1T"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it: HF_HUB_CACHE, else $HF_HOME/hub."""
    return Path(os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"))


def hf_cache_snapshot(repo: str = HUB_REPO) -> Path | None:
    """The local snapshot of `repo` in the Hugging Face cache that `refs/main` names, else the newest one with
    a config.json (never downloads)."""
    entry = hub_cache_dir() / f"models--{repo.replace('/', '--')}"
    snaps = entry / "snapshots"
    if not snaps.is_dir():
        return None
    try:
        with open(entry / "refs" / "main", "rb") as f:
            rev = f.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        rev = ""
    if re.fullmatch(r"[0-9a-f]{40}", rev) and (snaps / rev / "config.json").is_file():
        return snaps / rev
    found = [p for p in snaps.iterdir() if (p / "config.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def hf_cache_entry(root: str | Path) -> Path | None:
    """The `models--org--name` cache entry that a snapshot directory `<entry>/snapshots/<rev>` belongs to, or
    None when `root` is not laid out that way."""
    real = Path(os.path.realpath(root))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return None


def checkpoint_file(root: str | Path, name: str, error: type[EmoEdgeError] = EmoEdgeError) -> Path:
    """`root / name`, refused (one line naming the file) unless `name` is a plain file name of the checkpoint
    directory that resolves, symlinks followed, inside it (or inside its hub cache entry)."""
    root = Path(root)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise error(f"{root}: {name!r} is not a plain file name in the checkpoint directory")
    return confined(root, name, str(root / name), error, allowed_root=hf_cache_entry(root))


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
    if notice:  # on stderr, unless --quiet / TQDM_DISABLE
        from ..progress import note

        note(f"note: no model given; using the embedded default {EMBEDDED.name} "
             f"(set --model or EMO_EDGE_MODEL to use another)")
    return EMBEDDED
