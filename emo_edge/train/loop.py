"""Data preparation, the training loop, evaluation and checkpoint export for the tiny EMO and its twin."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointView
from ..hfconfig import emo_config
from ..names import expected_tensors
from ..spec import spec_from_config
from ..tokenizer import tokenizer_files, train_bpe
from ..writer import write_checkpoint
from . import data as D
from .model import ModelConfig, TinyEmo, hf_state, load_hf_state
from .state import load_state, save_state, state_dir

MODEL_NAMES = {"emo": "emo-tiny", "topk": "stdmoe-tiny"}


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

    def to_dict(self) -> dict:
        return asdict(self)


def quick_config() -> TrainConfig:
    m = ModelConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                    intermediate_size=16, num_experts=8, top_k=3)
    return TrainConfig(model=m, seq_len=64, batch=4, steps=4, warmup=2, pool_min=2, pool_max=7, log_every=1,
                       eval_every=1000, eval_rows=4, quick=True)


# ---- data preparation (once, shared by both runs) -----------------------------------------------------------
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
    return info


def load_data(work: Path) -> tuple[dict, dict]:
    z = np.load(work / "data.npz")
    train = {k[len("train_"):]: torch.from_numpy(z[k].astype(np.int64)) for k in z.files if k.startswith("train_")}
    held: dict[str, dict] = {}
    for k in z.files:
        if k.startswith("heldout:"):
            name, part = k[len("heldout:"):].rsplit("_", 1)
            held.setdefault(name, {})[part] = torch.from_numpy(z[k].astype(np.int64))
    return train, held


# ---- evaluation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: TinyEmo, held: dict, rows: int | None, batch: int = 16) -> dict[str, float]:
    """Mean next-token loss per held-out set, full (unpooled) routing, as the saved checkpoint computes it."""
    model.eval()
    out = {}
    for name, t in sorted(held.items()):
        n = t["ids"].shape[0] if rows is None else min(rows, t["ids"].shape[0])
        tot, cnt = 0.0, 0
        for i in range(0, n, batch):
            sl = slice(i, min(n, i + batch))
            logits, _ = model(t["ids"][sl], pos=t["pos"][sl], seg=t["seg"][sl], mode="full")
            lab = t["labels"][sl]
            tot += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                         ignore_index=-100, reduction="sum"))
            cnt += int((lab != -100).sum())
        out[name] = tot / max(cnt, 1)
    model.train()
    return out


def task_accuracy(path: Path, log=print) -> dict:
    """Greedy accuracy of a written checkpoint (full model, fp32 reference) on the built-in held-out task sets."""
    from ..data import task_items
    from ..data.tasks import TASK_FAMILIES
    from ..evaluate.report import score
    from ..evaluate.scorers import ReferenceScorer
    from ..evaluate.tasks import TaskSet

    view = CheckpointView(path)
    try:
        scorer = ReferenceScorer(view)
        out = {}
        for family in TASK_FAMILIES:
            s = score(scorer, TaskSet(family, tuple(task_items(family))), 160)
            out[family] = {"n": s.n, "correct": s.correct, "accuracy": s.accuracy}
            log(f"[{path.name}] held-out {family}: {s.correct}/{s.n} ({100 * s.accuracy:.1f}%)")
    finally:
        view.close()
    return out


def finalize(kind: str, cfg: TrainConfig, work: Path, out_root: Path, command: str, log=print) -> dict:
    """Measure a written model's held-out task accuracy and rewrite its model card (README.md) from the run's
    result file; the weights are not touched."""
    from .card import model_card

    name = MODEL_NAMES[kind]
    result = json.loads((work / f"{name}.result.json").read_text())
    info = json.loads((work / "data.json").read_text())
    result["task_accuracy"] = task_accuracy(out_root / name, log=log)
    (out_root / name / "README.md").write_text(model_card(name, kind, cfg, info, result, command), encoding="utf-8")
    (work / f"{name}.result.json").write_text(json.dumps(result, indent=2))
    log(f"[{name}] model card rewritten with held-out accuracy")
    return result


# ---- export --------------------------------------------------------------------------------------------------
def hf_config(cfg: TrainConfig) -> dict:
    m = cfg.model
    return emo_config(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                      num_key_value_heads=m.num_kv_heads, num_experts=m.num_experts, num_experts_per_tok=m.top_k,
                      num_shared_experts=1, norm_topk_prob=False, tie_word_embeddings=False,
                      rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps,
                      max_position_embeddings=cfg.max_positions, eos_token_id=D.EOS_ID, pad_token_id=D.PAD_ID)


def export(model: TinyEmo, cfg: TrainConfig, out: Path, tok_json: str, extra: dict[str, bytes] | None = None) -> Path:
    """Write the model in the upstream HF layout (bf16) and check it reads back to the same (bf16) weights."""
    config = hf_config(cfg)
    spec = spec_from_config(config)
    shapes = {k.hf_name: s for k, s in expected_tensors(spec).items()}
    state = hf_state(model)
    if set(shapes) != set(state):
        raise RuntimeError(f"tensor names differ from the upstream table: {sorted(set(shapes) ^ set(state))[:5]}")
    files = dict(tokenizer_files(tok_json, cfg.max_positions))
    files["generation_config.json"] = (json.dumps({"eos_token_id": D.EOS_ID, "pad_token_id": D.PAD_ID,
                                                   "transformers_version": "4.57.0"}, indent=2) + "\n").encode()
    files.update(extra or {})
    write_checkpoint(out, config, shapes, lambda n: state[n].numpy(), dtype="bf16", extra_files=files, force=True)
    view = CheckpointView(out)
    try:
        for name, t in state.items():
            back = view.tensor(name)
            ref = t.to(torch.bfloat16).float().numpy()
            if not np.array_equal(back.numpy(), ref):
                raise RuntimeError(f"{out}: tensor {name} does not read back as written")
    finally:
        view.close()
    return out


def load_checkpoint_model(path: Path) -> TinyEmo:
    """A TinyEmo with the (float32-widened) weights of a checkpoint written by `export`."""
    view = CheckpointView(path)
    try:
        s = view.spec
        m = ModelConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_layers,
                        num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, intermediate_size=s.intermediate_size,
                        num_experts=s.layers[0].num_experts, top_k=s.top_k, rope_theta=s.rope_theta,
                        rms_norm_eps=s.rms_norm_eps)
        model = TinyEmo(m)
        load_hf_state(model, lambda n: view.tensor(n).numpy())
    finally:
        view.close()
    model.eval()
    return model


# ---- training ------------------------------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_one(kind: str, cfg: TrainConfig, work: Path, out_root: Path, command: str, threads: int = 1,
              log=print) -> dict:
    """Train one model (`kind` "emo" or "topk") from scratch and write it to out_root/<name>."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    name = MODEL_NAMES[kind]
    train, held = load_data(work)
    info = json.loads((work / "data.json").read_text())
    tok_json = (work / "tokenizer.json").read_text(encoding="utf-8")
    model = TinyEmo(cfg.model)
    model.init_weights(cfg.seed)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    rows = train["ids"].shape[0]
    order_rng = np.random.default_rng(cfg.seed)
    order = order_rng.permutation(rows)
    cursor = 0
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    history: list[dict] = []
    evals: list[dict] = []
    start_step, tokens, elapsed_before = 0, 0, 0.0
    config_key = json.loads(json.dumps(cfg.to_dict()))
    resumed = load_state(work, name, config_key, model, opt, gen)
    if resumed is not None:
        meta, order = resumed
        start_step, cursor, tokens = meta["step"], meta["cursor"], meta["tokens"]
        order_rng.bit_generator.state = meta["order_rng"]
        history, evals, elapsed_before = meta["history"], meta["evals"], meta["elapsed_s"]
        log(f"[{name}] resumed from {state_dir(work, name)} at step {start_step}/{cfg.steps}")
    metrics_path = work / f"{name}.metrics.jsonl"
    metrics = open(metrics_path, "a" if resumed is not None else "w")
    t_start = time.time() - elapsed_before
    last_ckpt = time.time()
    acc = {"ce": 0.0, "aux": 0.0, "n": 0}
    for step in range(start_step, cfg.steps):
        if cursor + cfg.batch > rows:
            order, cursor = order_rng.permutation(rows), 0
        idx = torch.from_numpy(order[cursor:cursor + cfg.batch])
        cursor += cfg.batch
        ids, seg, pos, labels = (train[k][idx] for k in ("ids", "seg", "pos", "labels"))
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        logits, aux = model(ids, pos=pos, seg=seg, mode=kind, pool_range=(cfg.pool_min, cfg.pool_max), gen=gen)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        loss = ce + cfg.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tokens += int((seg >= 0).sum())
        acc["ce"] += ce.item()
        acc["aux"] += aux.item()
        acc["n"] += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            el = time.time() - t_start
            rec = {"step": step + 1, "ce": acc["ce"] / acc["n"], "aux": acc["aux"] / acc["n"],
                   "lr": lr_at(cfg, step), "tokens": tokens, "elapsed_s": round(el, 1),
                   "tok_per_s": round(tokens / max(el, 1e-9))}
            history.append(rec)
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            log(f"[{name}] step {rec['step']}/{cfg.steps} ce {rec['ce']:.4f} aux {rec['aux']:.4f} "
                f"lr {rec['lr']:.2e} {rec['tok_per_s']} tok/s {el / 60:.1f} min")
            acc = {"ce": 0.0, "aux": 0.0, "n": 0}
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            ev = evaluate(model, held, cfg.eval_rows)
            evals.append({"step": step + 1, **ev})
            metrics.write(json.dumps({"eval_step": step + 1, **ev}) + "\n")
            metrics.flush()
            log(f"[{name}] eval step {step + 1}: " + " ".join(f"{k} {v:.3f}" for k, v in ev.items()))
        if time.time() - last_ckpt > cfg.ckpt_minutes * 60 and step + 1 < cfg.steps:
            # a whole step's state (acc is empty right after a log line: steps are saved on log boundaries)
            if acc["n"] == 0:
                save_state(work, name, model, opt, {
                    "config": config_key, "step": step + 1, "cursor": cursor, "tokens": tokens,
                    "order_rng": order_rng.bit_generator.state, "history": history, "evals": evals,
                    "elapsed_s": time.time() - t_start}, order, gen)
                export(model, cfg, work / f"{name}-latest", tok_json)
                (work / f"{name}-latest.step").write_text(str(step + 1))
                last_ckpt = time.time()
                log(f"[{name}] state saved at step {step + 1}: {state_dir(work, name)}")
    train_s = time.time() - t_start
    final = evaluate(model, held, cfg.eval_rows if cfg.quick else cfg.final_eval_rows)
    evals.append({"step": cfg.steps, **final})
    metrics.write(json.dumps({"eval_step": cfg.steps, "final": True, **final}) + "\n")
    metrics.close()
    log(f"[{name}] final held-out: " + " ".join(f"{k} {v:.3f}" for k, v in final.items()))
    result = {"name": name, "kind": kind, "steps": cfg.steps, "train_seconds": round(train_s, 1),
              "tokens_seen": tokens, "tok_per_s": round(tokens / max(train_s, 1e-9)),
              "final_train_ce": sum(h["ce"] for h in history[-5:]) / len(history[-5:]),
              "final_heldout": final, "seed": cfg.seed}
    from .card import loss_png, model_card
    extra = {"README.md": model_card(name, kind, cfg, info, result, command).encode()}
    png = loss_png(name, history, evals)
    if png:
        extra["loss_curve.png"] = png
    out = export(model, cfg, out_root / name, tok_json, extra)
    if not cfg.quick:  # held-out accuracy of the written checkpoint, into the result and the model card
        result["task_accuracy"] = task_accuracy(out, log=log)
        extra["README.md"] = model_card(name, kind, cfg, info, result, command).encode()
        out = export(model, cfg, out_root / name, tok_json, extra)
    (work / f"{name}.result.json").write_text(json.dumps(result, indent=2))
    log(f"[{name}] wrote {out}")
    return result
