"""Domain data for emo-edge: project-written generators and the committed calibration and held-out sets.

- `generators.py`: deterministic generators for math, code, prose, chat and records documents.
- `calib/{math,code,prose,chat}.jsonl`: built-in calibration sets (JSON lines, field "text").
- `heldout/{math,code,prose,chat,records}.jsonl`: held-out evaluation sets, never used for training.

All committed files are produced by `python -m emo_edge.data` from the generators with fixed seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
CALIB_DOMAINS = ("math", "code", "prose", "chat")
HELDOUT_DOMAINS = ("math", "code", "prose", "chat", "records")


def read_jsonl(path: str | Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def calib_texts(domain: str) -> list[str]:
    return read_jsonl(DATA_DIR / "calib" / f"{domain}.jsonl")


def heldout_texts(domain: str) -> list[str]:
    return read_jsonl(DATA_DIR / "heldout" / f"{domain}.jsonl")
