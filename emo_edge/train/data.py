"""Training corpus: generated documents for five domains, plus (at training time only, never committed) Python
standard-library sources for `code` and English man pages for `prose`; tokenization and packing.

Held-out data:
- generated domains: `emo_edge/data/heldout/*.jsonl` (committed, produced by the generators with seeds disjoint
  from training; any training document equal to a held-out one is dropped);
- machine sources: a deterministic split by file-name hash (`_is_heldout`), the held-out part written to the
  work directory (`heldout_machine/*.jsonl`), not committed.

Packing: each document gets an EOS token appended; the token stream of a document is laid into rows of `seq_len`
tokens; a row holds several documents as separate segments (attention, positions and EMO pools never cross a
segment); a document that does not fit in the rest of a row continues as a new segment in the next row.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import HELDOUT_DOMAINS, heldout_texts
from ..data.generators import DOMAINS, generate
from ..data.tasks import TASK_DOMAIN, training_tasks
from ..data import task_items

EOS_ID, PAD_ID = 0, 1


@dataclass
class DataPlan:
    """How many documents each source contributes to training."""
    generated: dict  # domain -> number of generated train documents
    stdlib_files: int  # max stdlib .py files (code); 0 = none
    man_pages: int  # max man pages (prose); 0 = none
    tasks: dict = None  # task family -> number of one-task documents (data/tasks.py), held-out prompts excluded
    max_chars: int = 12_000  # machine documents are cut into pieces of at most this many characters
    equation_style: str = "short"  # the equations' working (data/tasks.py `equation`)
    task_seed: int = 1  # seeds the task documents (a second stage draws new instances)


FULL_PLAN = DataPlan(generated={"math": 9000, "code": 1800, "prose": 5500, "chat": 15000, "records": 10000},
                     stdlib_files=300, man_pages=400,
                     tasks={"equations": 50_000, "arithmetic": 80_000, "code": 70_000})
QUICK_PLAN = DataPlan(generated={d: 30 for d in DOMAINS}, stdlib_files=0, man_pages=0,
                      tasks={"equations": 20, "arithmetic": 20, "code": 20})
# The anneal stage (after pretraining, at a lower learning rate): new task instances, the equations' middle step
# worked digit by digit, more REPL transcripts, and a replay of every free-text domain so none is forgotten.
ANNEAL_PLAN = DataPlan(generated={"math": 1500, "code": 600, "prose": 1200, "chat": 4000, "records": 2500},
                       stdlib_files=60, man_pages=80,
                       tasks={"equations": 40_000, "arithmetic": 50_000, "code": 90_000},
                       equation_style="column", task_seed=2)
QUICK_ANNEAL_PLAN = DataPlan(generated={d: 10 for d in DOMAINS}, stdlib_files=0, man_pages=0,
                             tasks={"equations": 10, "arithmetic": 10, "code": 10}, equation_style="column",
                             task_seed=2)


def _is_heldout(key: str, frac: float = 0.05) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < frac


def _chunks(text: str, max_chars: int) -> list[str]:
    """Cut a long file into pieces at blank lines, each at most ~max_chars."""
    out, cur, n = [], [], 0
    for para in text.split("\n\n"):
        if n + len(para) > max_chars and cur:
            out.append("\n\n".join(cur))
            cur, n = [], 0
        cur.append(para[:max_chars])
        n += len(para) + 2
    if cur:
        out.append("\n\n".join(cur))
    return [c for c in out if len(c.strip()) > 200]


def stdlib_sources(limit: int) -> list[tuple[str, str]]:
    """(relative path, source) of up to `limit` stdlib .py files, in a deterministic order (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not any(part in ("test", "tests", "site-packages", "idle_test", "__pycache__")
                              for part in p.relative_to(root).parts))
    random.Random(17).shuffle(files)
    out = []
    for p in files[:limit]:
        try:
            out.append((str(p.relative_to(root)), p.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return out


_ESC = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\s[-+]?\d|\\\((..)|\\\*\(..|\\\*.|\\[&|^~:%ec]")


def _strip_troff(src: str) -> str:
    lines, paras = [], []
    for line in src.splitlines():
        if line.startswith((".", "'")):
            if line[:3] in (".PP", ".LP", ".P", ".SH", ".SS", ".TP", ".IP", ".sp", ".br") and lines:
                paras.append(" ".join(lines))
                lines = []
            if line.startswith((".SH", ".SS")):
                title = line[3:].strip().strip('"')
                if title:
                    paras.append(title.capitalize())
            continue
        line = _ESC.sub("", line).replace("\\-", "-").replace("\\(em", "-").replace("\\e", "\\").strip()
        if line:
            lines.append(line)
    if lines:
        paras.append(" ".join(lines))
    return "\n\n".join(p for p in paras if p)


def man_pages(limit: int) -> list[tuple[str, str]]:
    """(name, plain text) of up to `limit` English man pages (sections 1, 5, 7, 8), crudely de-troffed."""
    root = Path("/usr/share/man")
    files = []
    for sec in ("man1", "man5", "man7", "man8"):
        d = root / sec
        if d.is_dir():
            files += sorted(f for f in d.glob("*.gz") if not f.name.startswith("gcloud"))  # 16k near-identical CLI pages
    random.Random(23).shuffle(files)
    out = []
    for p in files:
        if len(out) >= limit:
            break
        try:
            raw = gzip.open(p, "rt", encoding="utf-8", errors="strict").read()
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        if raw.startswith(".so ") or len(raw) < 1500:
            continue
        text = _strip_troff(raw)
        letters = sum(c.isascii() and c.isalpha() for c in text)
        if len(text) > 800 and letters / len(text) > 0.6:
            out.append((p.name, text))
    return out


def build_corpus(plan: DataPlan, work: Path) -> tuple[dict, dict, dict]:
    """Returns (train, heldout, stats): train/heldout map domain -> list of documents; heldout also has
    'code-stdlib' and 'prose-man' (written under work/heldout_machine) when machine sources are used."""
    train: dict[str, list[str]] = {}
    heldout: dict[str, list[str]] = {}
    for d in DOMAINS:
        held = heldout_texts(d) if d in HELDOUT_DOMAINS else []
        hs = set(held)
        train[d] = [t for t in generate(d, plan.generated[d], "train") if t not in hs]
        heldout[d] = held
    for family, count in (plan.tasks or {}).items():
        exclude = {t.prompt for t in task_items(family)}
        train[TASK_DOMAIN[family]] += training_tasks(family, count, exclude, seed=plan.task_seed,
                                                     style=plan.equation_style)
    extra = {}
    if plan.stdlib_files:
        extra["code-stdlib"] = ("code", stdlib_sources(plan.stdlib_files))
    if plan.man_pages:
        extra["prose-man"] = ("prose", man_pages(plan.man_pages))
    (work / "heldout_machine").mkdir(parents=True, exist_ok=True)
    for name, (domain, files) in extra.items():
        held = []
        for key, text in files:
            pieces = _chunks(text, plan.max_chars)
            (held if _is_heldout(key) else train[domain]).extend(pieces)
        heldout[name] = held[:200]
        with open(work / "heldout_machine" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for t in heldout[name]:
                f.write(json.dumps({"text": t}) + "\n")
    stats = {d: {"train_docs": len(v), "train_chars": sum(map(len, v))} for d, v in train.items()}
    for d, v in heldout.items():
        stats.setdefault(d, {}).update(heldout_docs=len(v), heldout_chars=sum(map(len, v)))
    return train, heldout, stats


def tokenizer_sample(train: dict, max_chars_per_domain: int = 1_500_000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for d in sorted(train):
        docs = list(train[d])
        rng.shuffle(docs)
        n = 0
        for t in docs:
            if n > max_chars_per_domain:
                break
            out.append(t)
            n += len(t)
    return out


def encode_all(tok, docs: list[str]) -> list[np.ndarray]:
    encs = tok.encode_batch(docs, add_special_tokens=False)
    return [np.asarray(e.ids + [EOS_ID], dtype=np.int32) for e in encs]


def pack(docs: list[np.ndarray], seq_len: int, min_piece: int = 16) -> dict[str, np.ndarray]:
    """Lay documents (token arrays, EOS included) into rows. Returns ids, seg (-1 = pad), pos, labels (-100 =
    no loss), each (rows, seq_len)."""
    rows_ids, rows_seg, rows_pos = [], [], []
    ids = np.full(seq_len, PAD_ID, np.int32)
    seg = np.full(seq_len, -1, np.int32)
    pos = np.zeros(seq_len, np.int32)
    fill, nseg = 0, 0

    def flush():
        nonlocal ids, seg, pos, fill, nseg
        rows_ids.append(ids); rows_seg.append(seg); rows_pos.append(pos)
        ids = np.full(seq_len, PAD_ID, np.int32)
        seg = np.full(seq_len, -1, np.int32)
        pos = np.zeros(seq_len, np.int32)
        fill, nseg = 0, 0

    for doc in docs:
        i = 0
        while i < len(doc):
            room = seq_len - fill
            if room < min_piece and fill:
                flush()
                room = seq_len
            n = min(room, len(doc) - i)
            ids[fill:fill + n] = doc[i:i + n]
            seg[fill:fill + n] = nseg
            pos[fill:fill + n] = np.arange(n)
            fill += n
            nseg += 1
            i += n
            if fill == seq_len:
                flush()
    if fill:
        flush()
    ids, seg, pos = np.stack(rows_ids), np.stack(rows_seg), np.stack(rows_pos)
    labels = np.full_like(ids, -100)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] >= 0)
    labels[:, :-1] = np.where(same, ids[:, 1:], -100)
    return {"ids": ids, "seg": seg, "pos": pos, "labels": labels}


def count_tokens(docs: list[np.ndarray]) -> int:
    return int(sum(len(d) for d in docs))


def cpu_count() -> int:
    return os.cpu_count() or 1
