"""Calibration (and held-out) text: reading documents from files and tokenizing them.

File convention (documented in `emo-edge pools discover --help`):
- JSON lines (`*.jsonl`, or any file whose first non-blank character is `{`): one document per line, taken from
  its "text" field. Blank lines are skipped. Use this format when documents contain blank lines (code).
- anything else is plain UTF-8 text: documents are separated by one or more blank lines.

Documents are tokenized with the checkpoint's tokenizer and truncated to `max_tokens` each (default 1024, or
the model's max_position_embeddings when smaller); documents with fewer than 2 tokens are dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PoolError

DEFAULT_MAX_TOKENS = 1024


@dataclass
class CalibFile:
    name: str  # base name only: provenance must not depend on where the file lives
    sha256: str
    documents: int
    tokens: int

    def to_json(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "documents": self.documents, "tokens": self.tokens}


@dataclass
class Calibration:
    docs: list[list[int]] = field(default_factory=list)
    files: list[CalibFile] = field(default_factory=list)
    max_tokens: int = DEFAULT_MAX_TOKENS

    @property
    def tokens(self) -> int:
        return sum(len(d) for d in self.docs)

    def provenance(self) -> dict:
        return {"files": [f.to_json() for f in self.files], "documents": len(self.docs), "tokens": self.tokens,
                "max_tokens_per_document": self.max_tokens}


def read_documents(path: str | Path) -> tuple[list[str], bytes]:
    """The documents of a calibration/held-out file and its raw bytes. Raises PoolError on bad input."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PoolError(f"{path}: calibration file not found") from None
    except IsADirectoryError:
        raise PoolError(f"{path}: is a directory, expected a text or JSONL file") from None
    except OSError as exc:
        raise PoolError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PoolError(f"{path}: not UTF-8 text (byte {exc.start}); give plain text or JSONL") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\x00" in text:
        raise PoolError(f"{path}: contains NUL bytes; give plain text or JSONL")
    stripped = text.lstrip()
    if path.suffix.lower() in (".jsonl", ".ndjson") or stripped.startswith("{"):
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PoolError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise PoolError(f"{path}:{n}: expected a JSON object with a string \"text\" field")
            if obj["text"].strip():
                docs.append(obj["text"])
    else:
        docs = [d.strip("\n") for d in re.split(r"\n[ \t]*\n(?:[ \t]*\n)*", text.replace("\r\n", "\n"))]
        docs = [d for d in docs if d.strip()]
    if not docs:
        raise PoolError(f"{path}: no documents (the file is empty)")
    return docs, raw


def load_calibration(paths: list[str | Path], tokenizer, max_tokens: int | None = None,
                     max_docs: int | None = None) -> Calibration:
    """Read and tokenize calibration files (in the given order). `max_docs` caps documents per file."""
    if not paths:
        raise PoolError("no calibration files given (use --calib FILE)")
    cal = Calibration(max_tokens=max_tokens or DEFAULT_MAX_TOKENS)
    for p in paths:
        docs, raw = read_documents(p)
        if max_docs is not None:
            docs = docs[:max_docs]
        n_docs = n_tok = 0
        for doc in docs:
            ids = tokenizer.encode(doc)[: cal.max_tokens]
            if len(ids) < 2:
                continue
            cal.docs.append(ids)
            n_docs += 1
            n_tok += len(ids)
        if n_docs == 0:
            raise PoolError(f"{p}: no document has 2 or more tokens")
        cal.files.append(CalibFile(Path(p).name, hashlib.sha256(raw).hexdigest(), n_docs, n_tok))
    return cal
