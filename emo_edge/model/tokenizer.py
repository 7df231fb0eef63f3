"""Byte-level BPE tokenizers: training our own (for synthetic and trained checkpoints) and loading any
checkpoint's `tokenizer.json` (the real dolma2 tokenizer included) with the `tokenizers` library.

Our tokenizers put the special tokens first: id 0 is `<|endoftext|>` (eos), id 1 is `<|pad|>`.
"""

from __future__ import annotations

import json
import re
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import EmoEdgeError

EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIALS = (EOS, PAD)
MAX_TOKENIZER_BYTES = 256 << 20  # real tokenizer.json files are a few MB (dolma2's: ~7 MB)


def train_bpe(texts: Iterable[str], vocab_size: int, split_digits: bool = False) -> str:
    """Train a byte-level BPE on `texts`; returns tokenizer.json text. Deterministic for the same input.
    `split_digits`: every digit is a token of its own (numbers are read and written digit by digit, which is what
    lets a small model learn arithmetic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


# What the decoder graph takes from a tokenizer: transformers' PreTrainedTokenizerFast would otherwise also return
# token_type_ids, which no causal LM graph (ours, optimum's) has as an input.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


def tokenizer_config(model_max_length: int = 4096) -> dict:
    """The tokenizer_config.json that accompanies our tokenizer.json."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_input_names": list(MODEL_INPUT_NAMES),
        "eos_token": EOS,
        "pad_token": PAD,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


# What a tokenizer.json may hold, beyond what the library parses: no padding or truncation (a fixed padding of
# 10^9 tokens aborts the process on allocation; emo-edge pads nothing), and no regex whose shape backtracks
# without bound (a quantified group that itself holds a quantifier: "(a+)+"), in pre-tokenizers and normalizers.
_BACKREFERENCE = re.compile(r"\\[1-9]|\\k<")


def _backtracks(pattern: str) -> bool:
    """True when `pattern` quantifies a group that contains a quantifier or an alternation (the catastrophic
    shapes: "(a+)+", "(a|aa)+"), or uses a backreference. A heuristic on the text, conservative: the
    pre-tokenizer regexes of GPT-2, cl100k/dolma2 and Llama 3 pass it."""
    if _BACKREFERENCE.search(pattern):
        return True
    stack: list[bool] = []  # per open group: does it hold a quantifier?
    i, n, in_class = 0, len(pattern), False
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            stack.append(False)
        elif c == ")":
            inner = stack.pop() if stack else False
            nxt = pattern[i + 1:i + 2]
            quantified = nxt in ("+", "*") or (nxt == "{" and re.match(r"\{\d*,?\d*\}", pattern[i + 1:]) is not None)
            if inner and quantified:
                return True
            if stack and (inner or quantified):
                stack[-1] = True
        elif c in "+*|" or (c == "{" and re.match(r"\{\d*,?\d*\}", pattern[i:])):
            if stack:  # a quantifier, or an alternation (whose branches can overlap: "(a|aa)+")
                stack[-1] = True
        i += 1
    return False


def _regexes(node, where: str):
    """(where, pattern) of every {"Regex": ...} pattern in a tokenizer.json subtree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "Regex" and isinstance(v, str):
                yield where, v
            else:
                yield from _regexes(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _regexes(v, f"{where}[{i}]")


def check_tokenizer_json(data, where: str) -> None:
    if not isinstance(data, dict):
        raise EmoEdgeError(f"{where}: not a tokenizer (a JSON object expected)")
    for key in ("padding", "truncation"):
        if data.get(key) is not None:
            raise EmoEdgeError(f"{where}: field '{key}' must be null (emo-edge neither pads nor truncates; a "
                               f"tokenizer that does would change every prompt)")
    for part in ("normalizer", "pre_tokenizer"):
        for loc, pattern in _regexes(data.get(part), part):
            if len(pattern) > 1000 or _backtracks(pattern):
                raise EmoEdgeError(f"{where}: field '{loc}': regex {pattern[:60]!r} can backtrack without bound "
                                   f"(a quantified group holding a quantifier or an alternation, or a backreference); refused")


class TextTokenizer:
    """A thin wrapper over a tokenizer.json: encode/decode and the vocabulary."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        from ..schema import parse_json, read_bounded

        raw = read_bounded(self.path, EmoEdgeError, "not found", MAX_TOKENIZER_BYTES,
                           limit_note=f"; a tokenizer.json is at most {MAX_TOKENIZER_BYTES >> 20} MiB")
        check_tokenizer_json(parse_json(raw, str(self.path)), str(self.path))
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except BaseException as exc:  # a bare Exception on bad files; a pyo3 PanicException (BaseException) on worse
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise EmoEdgeError(f"{self.path}: cannot load tokenizer ({_first_line(exc)})") from None

    def _failed(self, exc: BaseException, what: str) -> EmoEdgeError:
        if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise exc
        return EmoEdgeError(f"{self.path}: the tokenizer failed to {what} ({_first_line(exc)})")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except BaseException as exc:  # noqa: BLE001 - a panic inside the library is a PanicException
            raise self._failed(exc, "encode") from None

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return self._tok.decode(list(ids), skip_special_tokens=False)
        except BaseException as exc:  # noqa: BLE001
            raise self._failed(exc, "decode") from None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def decoded_vocab(self) -> dict[int, str]:
        """id -> the text that token stands for (byte-level symbols turned back into characters)."""
        return {i: self._tok.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)}


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation becomes one prompt. Our tokenizer_config.json has no chat_template; this is the format
    of the `chat` domain the embedded models were trained on (emo_edge/data/generators.py `gen_chat`, its
    "User"/"Assistant" style): an optional "System: ..." line, then one "User: ..." / "Assistant: ..." line per
    turn, newline-separated, the document ending with EOS. The prompt for the next answer ends with
    "Assistant:"; the answer ends at EOS or where the model starts the next turn on a new line (`stop`)."""

    user: str = "User: "
    assistant: str = "Assistant: "
    system: str = "System: "
    stop: tuple[str, ...] = ("\nUser:", "\nAssistant:", "\nSystem:")

    def render(self, turns: Sequence[tuple[str, str | None]], system: str | None = None) -> str:
        """turns: (user message, assistant reply); the last reply None = the prompt for the next answer."""
        lines = [self.system + system] if system else []
        for user, reply in turns:
            lines.append(self.user + user)
            lines.append(self.assistant.rstrip() if reply is None else self.assistant + reply)
        return "\n".join(lines)


CHAT = ChatFormat()


class TextStream:
    """Incremental detokenization for streaming: `push(id)` writes the text that token completes (a multi-byte
    character split over tokens waits for its last byte). `stop` strings end the text: what precedes the
    first one is written, it and what follows are not, and `push` returns True from then on (the caller stops
    generating). Text that could still become a stop string is held back until it cannot."""

    def __init__(self, tokenizer: TextTokenizer, write, stop: Iterable[str] = ()):
        self.tok, self.write, self.stop = tokenizer, write, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text, self.shown, self.stopped = "", 0, False

    def push(self, token: int) -> bool:
        if self.stopped:
            return True
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # wait for a complete UTF-8 character
            return False
        self.text = text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            self._emit(len(self.text))
            return True
        self._emit(len(text) - self._held(text))
        return False

    def finish(self) -> str:
        """Write what is still held back; returns the whole text."""
        if not self.stopped:
            self.text = self.tok.decode(self.ids)
        self._emit(len(self.text))
        return self.text

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        return max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    def _emit(self, upto: int) -> None:
        if upto > self.shown:
            self.write(self.text[self.shown:upto])
            self.shown = upto


def load_tokenizer(checkpoint_dir: str | Path) -> TextTokenizer:
    """The checkpoint's tokenizer.json (refused if it leads outside the checkpoint, see models.checkpoint_file)."""
    from .locate import checkpoint_file

    path = checkpoint_file(checkpoint_dir, "tokenizer.json")
    if not path.is_file():
        raise EmoEdgeError(f"{path}: not found; the checkpoint has no tokenizer")
    return TextTokenizer(path)


def tokenizer_files(tokenizer_json: str, model_max_length: int = 4096) -> dict[str, bytes]:
    """Files to place next to a checkpoint or bundle."""
    cfg = tokenizer_config(model_max_length)
    special = {"eos_token": EOS, "pad_token": PAD}
    return {
        "tokenizer.json": tokenizer_json.encode(),
        "tokenizer_config.json": (json.dumps(cfg, indent=2) + "\n").encode(),
        "special_tokens_map.json": (json.dumps(special, indent=2) + "\n").encode(),
    }
