"""Regenerate the committed calibration and held-out sets: `python -m emo_edge.data`."""

from __future__ import annotations

import json

from . import CALIB_DOMAINS, DATA_DIR, HELDOUT_DOMAINS
from .generators import generate
from .choice import CHOICE_FAMILIES, heldout_choice
from .tasks import TASK_FAMILIES, heldout_tasks

N_CALIB = 32
HELDOUT_BYTES = 150_000  # per domain, well under the 300 KB limit
N_TASKS = 200  # held-out items per task family
N_CHOICE = 150  # held-out multiple-choice items per free-text domain
# the equations' working in calibration and held-out text: the style the models answer in (their anneal stage's,
# train/data.py ANNEAL_PLAN); measured on emo-tiny mid-anneal, the math pool found from column-style text kept
# equations at 81.0% (25% of the experts) / 98.0% (50%) against 67.5% / 92.0% from short-style text
STYLE = "column"


def _write(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def _write_items(path, items):
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def main() -> None:
    for d in CALIB_DOMAINS:
        _write(DATA_DIR / "calib" / f"{d}.jsonl", generate(d, N_CALIB, "calib", STYLE))
    for d in HELDOUT_DOMAINS:
        docs, size = [], 0
        for t in generate(d, 2000, "heldout", STYLE):
            if size + len(t) > HELDOUT_BYTES:
                break
            docs.append(t)
            size += len(t) + 12
        _write(DATA_DIR / "heldout" / f"{d}.jsonl", docs)
        print(f"heldout/{d}.jsonl: {len(docs)} docs")
    for family in TASK_FAMILIES:
        path = DATA_DIR / "tasks" / f"{family}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_items(path, heldout_tasks(family, N_TASKS))
        print(f"tasks/{family}.jsonl: {N_TASKS} items")
    for family in CHOICE_FAMILIES:
        _write_items(DATA_DIR / "tasks" / f"{family}.jsonl", heldout_choice(family, N_CHOICE))
        print(f"tasks/{family}.jsonl: {N_CHOICE} multiple-choice items")


if __name__ == "__main__":
    main()
