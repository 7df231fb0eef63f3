"""The training recipe's settings: the model shape, pretraining and the anneal stage (`python -m emo_edge.train`
trains with these; `--quick` with `quick_config`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .model import ModelConfig

MODEL_NAMES = {"emo": "emo-tiny", "topk": "stdmoe-tiny"}


@dataclass
class AnnealConfig:
    """The second stage: from the pretrained checkpoint (as written, bf16), a fresh AdamW over the anneal data
    (train/data.py ANNEAL_PLAN) with its own warmup and cosine schedule; routing as in pretraining."""
    steps: int = 3000
    lr: float = 1e-3
    warmup: int = 100
    min_lr_frac: float = 0.05


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    seq_len: int = 256
    batch: int = 12
    steps: int = 7000
    lr: float = 2e-3
    min_lr_frac: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_coef: float = 0.01
    pool_min: int = 4
    pool_max: int = 31
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 500
    eval_rows: int = 16  # rows per held-out set in periodic evals
    final_eval_rows: int = 96  # rows per held-out set in the final eval (~24k tokens each)
    ckpt_minutes: float = 10.0
    max_positions: int = 1024  # written to config.json (trained on seq_len)
    quick: bool = False
    anneal: AnnealConfig = field(default_factory=AnnealConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def pretrain_key(self) -> dict:
        """What a pretraining state or result must match to be reused (the anneal settings do not matter)."""
        d = json.loads(json.dumps(self.to_dict()))
        d.pop("anneal")
        return d


def quick_config() -> TrainConfig:
    m = ModelConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                    intermediate_size=16, num_experts=8, top_k=3)
    return TrainConfig(model=m, seq_len=64, batch=4, steps=4, warmup=2, pool_min=2, pool_max=7, log_every=1,
                       eval_every=1000, eval_rows=4, quick=True, anneal=AnnealConfig(steps=3, warmup=1))
