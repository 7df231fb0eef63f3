"""Calibration (and held-out) text: reading documents from files and tokenizing them.

File convention (documented in `emo-edge pools discover --help`):
- JSON lines (`*.jsonl`, or any file whose first non-blank character is `{`): one document per line, taken from
  its "text" field. Blank lines are skipped. Use this format when documents contain blank lines (code).
- anything else is plain UTF-8 text: documents are separated by one or more blank lines.

Documents are tokenized with the checkpoint's tokenizer and truncated to `max_tokens` each (default 1024, or
the model's max_position_embeddings when smaller); documents with fewer than 2 tokens are dropped.

Bounds (hostile or mistaken input fails in one line instead of exhausting memory): a file is read up to
MAX_FILE_BYTES (64 MiB), a document is at most MAX_DOCUMENT_CHARS (1 Mi characters) before tokenizing, and each
JSONL line is parsed strictly (no NaN, bounded nesting) and validated by `CalibLine`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import Field

from ..errors import PoolError
from ..schema import Schema, parse_json, read_bounded, validate

DEFAULT_MAX_TOKENS = 1024
MAX_FILE_BYTES = 64 << 20  # one calibration or held-out file (a handful of documents is what discovery needs)
MAX_DOCUMENT_CHARS = 1 << 20  # one document, before tokenizing (it is cut to max_tokens anyway)


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


class CalibLine(Schema):
    """One line of a calibration JSONL file: {"text": "..."} (other keys are ignored)."""

    text: Annotated[str, Field(strict=True, max_length=MAX_DOCUMENT_CHARS)]


def _read_bounded(path: Path) -> bytes:
    """At most MAX_FILE_BYTES of `path`; a pipe (`--calib <(...)`) is read the same bounded way, a device such
    as /dev/zero is refused after the bound rather than read until memory runs out."""
    return read_bounded(path, PoolError, "calibration file not found", MAX_FILE_BYTES, regular=False,
                        limit_note=f"; calibration files are at most {MAX_FILE_BYTES >> 20} MiB (a document at most "
                                   f"{MAX_DOCUMENT_CHARS} characters)")


def parse_jsonl(text: str, where: str) -> list[str]:
    """The "text" of each non-blank line of a JSONL file, each line parsed strictly and validated."""
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        obj = parse_json(line, f"{where}:{n}", PoolError)
        if not isinstance(obj, dict):
            raise PoolError(f"{where}:{n}: expected a JSON object with a string \"text\" field")
        doc = validate(obj, CalibLine, f"{where}:{n}", PoolError).text
        if doc.strip():
            docs.append(doc)
    return docs


def read_documents(path: str | Path) -> tuple[list[str], bytes]:
    """The documents of a calibration/held-out file and its raw bytes. Raises PoolError on bad input."""
    path = Path(path)
    raw = _read_bounded(path)
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
        docs = parse_jsonl(text, str(path))
    else:
        docs = [d.strip("\n") for d in re.split(r"\n[ \t]*\n(?:[ \t]*\n)*", text.replace("\r\n", "\n"))]
        docs = [d for d in docs if d.strip()]
    if not docs:
        raise PoolError(f"{path}: no documents (the file is empty)")
    for i, doc in enumerate(docs, 1):
        if len(doc) > MAX_DOCUMENT_CHARS:  # checked before anything is tokenized
            raise PoolError(f"{path}: document {i} has {len(doc)} characters; a document is at most "
                            f"{MAX_DOCUMENT_CHARS} characters (split it, or give JSONL lines)")
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
