"""Task files for `emo-edge eval`: exact-answer and multiple-choice items in JSON lines.

Exact answer: `{"prompt": str, "answer": str, "extract": RULE}` (`extract` may be left out when the file's rule
is given with `--extract`). The model continues the prompt greedily until its end-of-text token, a blank line
(`\\n\\n`), or `max_tokens`; the rule then takes the answer out of the completion:
- `last_x`: the integer of the last `x = N` statement;
- `last_int`: the last integer;
- `first_line`: the first line, stripped of surrounding white space.
An item is right when the extracted text equals `answer` exactly (integers compared as integers).

Multiple choice: `{"prompt": str, "choices": [str, ...], "label": int}`: each choice is scored by the summed
log-likelihood of its tokens after the prompt (the lm-evaluation-harness convention); the item is right when the
best-scoring choice is `label` (ties go to the lower index).

Files are read as every user file is: bounded, strictly parsed, each line validated (`TaskLine`); one line names
the file, line and field at fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from ..errors import EmoEdgeError
from ..schema import Schema, parse_json, read_bounded, validate

MAX_TASK_FILE_BYTES = 16 << 20
MAX_FIELD_CHARS = 64 << 10
MAX_CHOICES = 26
RULES = ("last_x", "last_int", "first_line")

_INT = re.compile(r"-?\d+")
_X_EQ = re.compile(r"\bx\s*=\s*(-?\d+)")


class TaskError(EmoEdgeError):
    pass


class TaskLine(Schema):
    """One task item: exact answer (prompt, answer[, extract]) or multiple choice (prompt, choices, label)."""

    prompt: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_FIELD_CHARS)]
    answer: Optional[Annotated[str, Field(strict=True, max_length=MAX_FIELD_CHARS)]] = None
    extract: Optional[Literal["last_x", "last_int", "first_line"]] = None
    choices: Optional[Annotated[list[Annotated[str, Field(strict=True, min_length=1, max_length=MAX_FIELD_CHARS)]],
                                Field(min_length=2, max_length=MAX_CHOICES)]] = None
    label: Optional[Annotated[int, Field(strict=True, ge=0)]] = None

    @model_validator(mode="after")
    def _one_kind(self):
        if self.choices is not None:
            if self.answer is not None or self.extract is not None:
                raise ValueError("an item has either choices and label, or answer (and extract), not both")
            if self.label is None:
                raise ValueError("a multiple-choice item needs 'label' (the index of the right choice)")
            if self.label >= len(self.choices):
                raise ValueError(f"label {self.label} is not an index of its {len(self.choices)} choices")
        elif self.answer is None:
            raise ValueError("an item needs 'answer' (exact answer) or 'choices' and 'label' (multiple choice)")
        elif self.label is not None:
            raise ValueError("'label' belongs to multiple-choice items (with 'choices')")
        return self


@dataclass(frozen=True)
class TaskItem:
    prompt: str
    answer: str | None = None
    extract: str | None = None
    choices: tuple[str, ...] | None = None
    label: int | None = None

    @property
    def kind(self) -> str:
        return "choice" if self.choices is not None else "exact"


@dataclass(frozen=True)
class TaskSet:
    name: str
    items: tuple[TaskItem, ...]

    @property
    def kind(self) -> str:
        return self.items[0].kind


def extract_answer(rule: str, completion: str) -> str | None:
    """The answer a rule takes out of a completion, or None when the completion holds none."""
    if rule == "last_x":
        found = _X_EQ.findall(completion)
        return str(int(found[-1])) if found else None
    if rule == "last_int":
        found = _INT.findall(completion)
        return str(int(found[-1])) if found else None
    if rule == "first_line":
        line = completion.split("\n", 1)[0].strip()
        return line or None
    raise TaskError(f"unknown extraction rule {rule!r} (one of {', '.join(RULES)})")


def is_correct(item: TaskItem, completion: str) -> bool:
    got = extract_answer(item.extract, completion)
    if got is None:
        return False
    want = item.answer.strip()
    if item.extract in ("last_x", "last_int") and _INT.fullmatch(want):
        return got == str(int(want))
    return got == want


def read_tasks(path: str | Path, extract: str | None = None, name: str | None = None) -> TaskSet:
    """The items of a task file, validated; `extract` is the rule for exact-answer lines that name none."""
    path = Path(path)
    raw = read_bounded(path, TaskError, "task file not found", MAX_TASK_FILE_BYTES,
                       limit_note=f"; a task file is at most {MAX_TASK_FILE_BYTES >> 20} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text (byte {exc.start}); a task file is JSON lines") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        obj = parse_json(line, where, TaskError)
        if not isinstance(obj, dict):
            raise TaskError(f"{where}: expected a JSON object (prompt with answer, or prompt with choices and label)")
        t = validate(obj, TaskLine, where, TaskError)
        if t.choices is not None:
            items.append(TaskItem(t.prompt, choices=tuple(t.choices), label=t.label))
            continue
        rule = t.extract or extract
        if rule is None:
            raise TaskError(f"{where}: field 'extract': no extraction rule (give one per line or --extract "
                            f"{'|'.join(RULES)})")
        items.append(TaskItem(t.prompt, answer=t.answer, extract=rule))
    if not items:
        raise TaskError(f"{path}: no task items (the file is empty)")
    kinds = {i.kind for i in items}
    if len(kinds) > 1:
        raise TaskError(f"{path}: mixes exact-answer and multiple-choice items; put each kind in its own file")
    return TaskSet(name or path.stem, tuple(items))
