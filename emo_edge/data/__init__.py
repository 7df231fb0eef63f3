"""Domain data for emo-edge: project-written generators and the committed calibration and held-out sets.

- `generators.py`: deterministic generators for math, code, prose, chat and records documents.
- `calib/{math,code,prose,chat}.jsonl`: built-in calibration sets (JSON lines, field "text").
- `heldout/{math,code,prose,chat,records}.jsonl`: held-out evaluation sets, never used for training.
- `tasks/{equations,arithmetic,code}.jsonl`: held-out exact-answer task sets (`tasks.py`); training drops every
  document whose prompt is in them.

All committed files are produced by `python -m emo_edge.data` from the generators with fixed seeds.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
CALIB_DOMAINS = ("math", "code", "prose", "chat")
HELDOUT_DOMAINS = ("math", "code", "prose", "chat", "records")


def read_jsonl(path: str | Path) -> list[str]:
    """The "text" of each line, read and validated as any calibration JSONL is (pools.calib.read_documents)."""
    from ..pools.calib import read_documents

    return read_documents(Path(path))[0]


def calib_texts(domain: str) -> list[str]:
    return read_jsonl(DATA_DIR / "calib" / f"{domain}.jsonl")


def heldout_texts(domain: str) -> list[str]:
    return read_jsonl(DATA_DIR / "heldout" / f"{domain}.jsonl")


def task_path(family: str) -> Path:
    return DATA_DIR / "tasks" / f"{family}.jsonl"


def task_items(family: str) -> list[dict]:
    """The built-in held-out items of a task family, read as any user task file is."""
    from ..evaluate.tasks import read_tasks

    return read_tasks(task_path(family)).items
