"""Data preparation (once, shared by both runs): the pretraining corpus and tokenizer, the anneal stage's rows,
and loading them back as tensors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..model.tokenizer import train_bpe
from . import data as D
from .config import TrainConfig


def prepare_data(cfg: TrainConfig, work: Path, log=print) -> dict:
    """Build the corpus, train the tokenizer, encode and pack; saves work/{tokenizer.json,data.npz,data.json}."""
    from tokenizers import Tokenizer

    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    plan = D.QUICK_PLAN if cfg.quick else D.FULL_PLAN
    train, heldout, stats = D.build_corpus(plan, work)
    log(f"corpus built in {time.time() - t0:.1f}s")
    tok_json = train_bpe(D.tokenizer_sample(train, 200_000 if cfg.quick else 1_500_000, cfg.seed),
                         cfg.model.vocab_size, split_digits=True)
    (work / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    tok = Tokenizer.from_str(tok_json)
    assert tok.token_to_id("<|endoftext|>") == D.EOS_ID and tok.token_to_id("<|pad|>") == D.PAD_ID
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab != cfg.model.vocab_size:
        raise RuntimeError(f"tokenizer has {vocab} tokens, expected {cfg.model.vocab_size}")
    log(f"tokenizer trained ({vocab} tokens) at {time.time() - t0:.1f}s")
    arrays: dict[str, np.ndarray] = {}
    all_train = []
    for d in sorted(train):
        enc = D.encode_all(tok, train[d])
        stats[d]["train_tokens"] = D.count_tokens(enc)
        all_train += enc
    random_order = np.random.default_rng(cfg.seed).permutation(len(all_train))
    packed = D.pack([all_train[i] for i in random_order], cfg.seq_len)
    for k, v in packed.items():
        arrays[f"train_{k}"] = v
    for d in sorted(heldout):
        enc = D.encode_all(tok, heldout[d])
        stats[d]["heldout_tokens"] = D.count_tokens(enc)
        for k, v in D.pack(enc, cfg.seq_len).items():
            arrays[f"heldout:{d}_{k}"] = v
    np.savez(work / "data.npz", **arrays)
    real = int((packed["seg"] >= 0).sum())
    info = {"stats": stats, "train_rows": int(packed["ids"].shape[0]), "train_tokens": real,
            "pad_fraction": 1 - real / packed["ids"].size, "heldout_sets": sorted(heldout)}
    (work / "data.json").write_text(json.dumps(info, indent=2))
    log(f"data ready at {time.time() - t0:.1f}s: {info['train_rows']} rows, {real} train tokens")
    return prepare_anneal_data(cfg, work, log) if cfg.anneal.steps else info


def prepare_anneal_data(cfg: TrainConfig, work: Path, log=print) -> dict:
    """The anneal stage's rows (train/data.py ANNEAL_PLAN), encoded with the pretraining tokenizer:
    work/anneal.npz and the `anneal` entry of work/data.json."""
    from tokenizers import Tokenizer

    t0 = time.time()
    plan = D.QUICK_ANNEAL_PLAN if cfg.quick else D.ANNEAL_PLAN
    train, _, stats = D.build_corpus(plan, work / "anneal")
    tok = Tokenizer.from_str((work / "tokenizer.json").read_text(encoding="utf-8"))
    all_train = []
    for d in sorted(train):
        enc = D.encode_all(tok, train[d])
        stats[d]["train_tokens"] = D.count_tokens(enc)
        all_train += enc
    order = np.random.default_rng(cfg.seed + 17).permutation(len(all_train))
    packed = D.pack([all_train[i] for i in order], cfg.seq_len)
    np.savez(work / "anneal.npz", **{f"train_{k}": v for k, v in packed.items()})
    real = int((packed["seg"] >= 0).sum())
    info = json.loads((work / "data.json").read_text())
    info["anneal"] = {"stats": {d: v for d, v in stats.items() if "train_docs" in v},
                      "train_rows": int(packed["ids"].shape[0]), "train_tokens": real}
    (work / "data.json").write_text(json.dumps(info, indent=2))
    log(f"anneal data ready at {time.time() - t0:.1f}s: {info['anneal']['train_rows']} rows, {real} train tokens")
    return info


def load_data(work: Path, which: str = "data") -> tuple[dict, dict]:
    z = np.load(work / f"{which}.npz")
    train = {k[len("train_"):]: torch.from_numpy(z[k].astype(np.int64)) for k in z.files if k.startswith("train_")}
    held: dict[str, dict] = {}
    for k in z.files:
        if k.startswith("heldout:"):
            name, part = k[len("heldout:"):].rsplit("_", 1)
            held.setdefault(name, {})[part] = torch.from_numpy(z[k].astype(np.int64))
    return train, held
