"""Byte-level BPE tokenizers: training our own (for synthetic and trained checkpoints) and loading any
checkpoint's `tokenizer.json` (the real dolma2 tokenizer included) with the `tokenizers` library.

Our tokenizers put the special tokens first: id 0 is `<|endoftext|>` (eos), id 1 is `<|pad|>`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .errors import EmoEdgeError

EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIALS = (EOS, PAD)


def train_bpe(texts: Iterable[str], vocab_size: int) -> str:
    """Train a byte-level BPE on `texts`; returns tokenizer.json text. Deterministic for the same input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def tokenizer_config(model_max_length: int = 4096) -> dict:
    """The tokenizer_config.json that accompanies our tokenizer.json."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": PAD,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }


class TextTokenizer:
    """A thin wrapper over a tokenizer.json: encode/decode and the vocabulary."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad files
            raise EmoEdgeError(f"{self.path}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def decoded_vocab(self) -> dict[int, str]:
        """id -> the text that token stands for (byte-level symbols turned back into characters)."""
        return {i: self._tok.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)}


def load_tokenizer(checkpoint_dir: str | Path) -> TextTokenizer:
    path = Path(checkpoint_dir) / "tokenizer.json"
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
