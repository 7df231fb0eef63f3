"""The training loop (pretraining, then the anneal stage), evaluation and checkpoint export for the tiny EMO and
its twin."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..model.checkpoint import CheckpointView
from ..model.hfconfig import emo_config
from ..model.names import expected_tensors
from ..model.spec import spec_from_config
from ..model.tokenizer import tokenizer_files
from ..model.writer import write_checkpoint
from . import data as D
from .config import MODEL_NAMES, TrainConfig
from .model import ModelConfig, TinyEmo, hf_state, load_hf_state
from .prepare import load_data
from .state import load_state, save_state, state_dir

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
def cosine_lr(lr: float, warmup: int, steps: int, min_frac: float, step: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def lr_at(cfg: TrainConfig, step: int) -> float:
    return cosine_lr(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_frac, step)


def _optimizer(model: TinyEmo, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)


@dataclass
class Stage:
    """One stage of a run: `steps` steps over `train` from the model as it is, saved under `state` every
    cfg.ckpt_minutes (resumed when the state's `key` matches); steps are numbered from `first_step` in logs."""
    label: str
    state: str
    key: dict
    train: dict
    steps: int
    lr: Callable[[int], float]
    seed: int
    first_step: int = 0


def run_stage(stage: Stage, kind: str, cfg: TrainConfig, model: TinyEmo, held: dict, work: Path, tok_json: str,
              log=print) -> dict:
    """Train `model` in place; returns {history, evals, tokens, seconds} of this stage."""
    opt = _optimizer(model, cfg, stage.lr(0))
    rows = stage.train["ids"].shape[0]
    order_rng = np.random.default_rng(stage.seed)
    order = order_rng.permutation(rows)
    cursor = 0
    gen = torch.Generator().manual_seed(stage.seed + 1)
    history: list[dict] = []
    evals: list[dict] = []
    start, tokens, elapsed_before = 0, 0, 0.0
    name, last = stage.state, stage.first_step + stage.steps
    resumed = load_state(work, name, stage.key, model, opt, gen)
    if resumed is not None:
        meta, order = resumed
        start, cursor, tokens = meta["step"], meta["cursor"], meta["tokens"]
        order_rng.bit_generator.state = meta["order_rng"]
        history, evals, elapsed_before = meta["history"], meta["evals"], meta["elapsed_s"]
        log(f"[{name}] resumed from {state_dir(work, name)} at step {stage.first_step + start}/{last}")
    metrics = open(work / f"{name}.metrics.jsonl", "a" if resumed is not None else "w")
    t_start = time.time() - elapsed_before
    last_ckpt = time.time()
    acc = {"ce": 0.0, "aux": 0.0, "n": 0}
    for step in range(start, stage.steps):
        gstep = stage.first_step + step + 1
        if cursor + cfg.batch > rows:
            order, cursor = order_rng.permutation(rows), 0
        idx = torch.from_numpy(order[cursor:cursor + cfg.batch])
        cursor += cfg.batch
        ids, seg, pos, labels = (stage.train[k][idx] for k in ("ids", "seg", "pos", "labels"))
        for g in opt.param_groups:
            g["lr"] = stage.lr(step)
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
        if (step + 1) % cfg.log_every == 0 or step + 1 == stage.steps:
            el = time.time() - t_start
            rec = {"step": gstep, "ce": acc["ce"] / acc["n"], "aux": acc["aux"] / acc["n"], "lr": stage.lr(step),
                   "tokens": tokens, "elapsed_s": round(el, 1), "tok_per_s": round(tokens / max(el, 1e-9))}
            history.append(rec)
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            log(f"[{name}] step {gstep}/{last} ce {rec['ce']:.4f} aux {rec['aux']:.4f} "
                f"lr {rec['lr']:.2e} {rec['tok_per_s']} tok/s {el / 60:.1f} min")
            acc = {"ce": 0.0, "aux": 0.0, "n": 0}
        if (step + 1) % cfg.eval_every == 0 and step + 1 < stage.steps:
            ev = evaluate(model, held, cfg.eval_rows)
            evals.append({"step": gstep, **ev})
            metrics.write(json.dumps({"eval_step": gstep, **ev}) + "\n")
            metrics.flush()
            log(f"[{name}] eval step {gstep}: " + " ".join(f"{k} {v:.3f}" for k, v in ev.items()))
        if time.time() - last_ckpt > cfg.ckpt_minutes * 60 and step + 1 < stage.steps and acc["n"] == 0:
            # a whole step's state (acc is empty right after a log line: steps are saved on log boundaries)
            save_state(work, name, model, opt, {
                "config": stage.key, "step": step + 1, "cursor": cursor, "tokens": tokens,
                "order_rng": order_rng.bit_generator.state, "history": history, "evals": evals,
                "elapsed_s": time.time() - t_start}, order, gen)
            export(model, cfg, work / f"{name}-latest", tok_json)
            (work / f"{name}-latest.step").write_text(str(gstep))
            last_ckpt = time.time()
            log(f"[{name}] state saved at step {gstep}: {state_dir(work, name)}")
    metrics.close()
    return {"history": history, "evals": evals, "tokens": tokens, "seconds": time.time() - t_start}


def _pretrained(kind: str, cfg: TrainConfig, work: Path, held: dict, tok_json: str, log) -> tuple[TinyEmo, dict]:
    """The pretraining stage's model as written (bf16) and its record: reused from work/<name>-pretrained when
    that was written for this configuration, else trained (resumably) and written there."""
    name = MODEL_NAMES[kind]
    done, record_path = work / f"{name}-pretrained", work / f"{name}-pretrained.json"
    key = cfg.pretrain_key()
    if record_path.is_file() and (done / "model.safetensors").is_file():
        record = json.loads(record_path.read_text())
        if record.get("config") == key:
            log(f"[{name}] pretraining done: {done}")
            return load_checkpoint_model(done), record
    torch.manual_seed(cfg.seed)
    model = TinyEmo(cfg.model)
    model.init_weights(cfg.seed)
    train, _ = load_data(work)
    stage = Stage("pretraining", name, key, train, cfg.steps, lambda s: lr_at(cfg, s), cfg.seed)
    res = run_stage(stage, kind, cfg, model, held, work, tok_json, log)
    export(model, cfg, done, tok_json)
    record = {"config": key, **res}
    tmp = record_path.with_name(record_path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(record_path)
    return load_checkpoint_model(done), record


def train_one(kind: str, cfg: TrainConfig, work: Path, out_root: Path, command: str, threads: int = 1,
              log=print) -> dict:
    """Train one model (`kind` "emo" or "topk") from scratch (pretraining, then the anneal stage from the
    pretrained checkpoint as written) and write it to out_root/<name>."""
    torch.set_num_threads(threads)
    name = MODEL_NAMES[kind]
    _, held = load_data(work)
    info = json.loads((work / "data.json").read_text())
    tok_json = (work / "tokenizer.json").read_text(encoding="utf-8")
    model, pre = _pretrained(kind, cfg, work, held, tok_json, log)
    model.train()
    a = cfg.anneal
    history, evals, tokens, train_s = pre["history"], pre["evals"], pre["tokens"], pre["seconds"]
    if a.steps:
        anneal_train, _ = load_data(work, "anneal")
        key = {**cfg.pretrain_key(), "anneal": asdict(a)}
        stage = Stage("anneal", f"{name}-anneal", key, anneal_train, a.steps,
                      lambda s: cosine_lr(a.lr, a.warmup, a.steps, a.min_lr_frac, s), cfg.seed + 17, cfg.steps)
        res = run_stage(stage, kind, cfg, model, held, work, tok_json, log)
        history, evals = history + res["history"], evals + res["evals"]
        tokens, train_s = tokens + res["tokens"], train_s + res["seconds"]
    total_steps = cfg.steps + a.steps
    final = evaluate(model, held, cfg.eval_rows if cfg.quick else cfg.final_eval_rows)
    evals.append({"step": total_steps, **final})
    log(f"[{name}] final held-out: " + " ".join(f"{k} {v:.3f}" for k, v in final.items()))
    result = {"name": name, "kind": kind, "steps": total_steps, "pretrain_steps": cfg.steps,
              "anneal_steps": a.steps, "pretrain_seconds": round(pre["seconds"], 1), "train_seconds": round(train_s, 1),
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
