"""Verification of a freshly built bundle against the reference restricted to the same experts.

fp32:      max |logit difference| <= 1e-3 x logit range on every held-out sequence, and identical greedy tokens.
quantized: top-1 agreement, KL(ref || bundle) and perplexity ratio against the fp32 reference, checked against
           the target's thresholds for the experts' precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..bundle import Bundle
HELDOUT = Path(__file__).resolve().parents[1] / "data" / "heldout"


# top-1 agreement is gated on *decisive* tokens only: where the reference's top-1 probability leads the runner-up
# by at least this much. Where the reference is nearly indifferent (flat logits, e.g. random synthetic weights),
# any quantization noise flips the argmax without changing the distribution; KL and perplexity ratio judge those.
DECISIVE_MARGIN = 0.2


def heldout_sequences(tokenize, vocab: int, n: int, length: int) -> list[list[int]]:
    """The first `n` documents of the held-out set, round-robin over its files, cut to `length` tokens."""
    files = sorted(HELDOUT.glob("*.jsonl"))
    docs = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            docs.append([json.loads(l)["text"] for l in fh if l.strip()][:n])
    out = []
    for i in range(n):
        for d in docs:
            if i < len(d) and len(out) < n:
                ids = [t for t in tokenize(d[i]) if t < vocab][:length]
                if len(ids) >= 4:
                    out.append(ids)
    if not out:
        raise ValueError("no held-out sequences")
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def verify(bundle_dir: Path, reference, tokenize, quantized: bool, thresholds: dict | None, n_seq: int = 4,
           length: int = 64, greedy_tokens: int = 32, threads: int | None = None, progress: bool = True) -> dict:
    import torch

    b = Bundle(bundle_dir, threads=threads, verify_files=False)
    seqs = heldout_sequences(tokenize, b.vocab_size, n_seq, min(length, b.context - greedy_tokens - 1))
    res = {"mode": "quantized" if quantized else "fp32", "sequences": len(seqs), "tokens": sum(map(len, seqs))}
    worst, worst_range, ok_logits = 0.0, 0.0, True
    agree = total = 0
    agree_decisive = n_decisive = 0
    kl_sum = nll_ref = nll_b = 0.0
    n_pred = 0
    for ids in tqdm(seqs, desc="verify: logits", unit="seq", disable=not progress, leave=False):
        ref = reference.forward(torch.tensor([ids]))[0].numpy()
        got = b.logits(ids)
        diff = float(np.abs(ref - got).max())
        rng_ = float(ref.max() - ref.min())
        if diff > 1e-3 * rng_:
            ok_logits = False
        if diff / max(rng_, 1e-30) >= worst / max(worst_range, 1e-30):
            worst, worst_range = diff, rng_
        same = ref.argmax(-1) == got.argmax(-1)
        agree += int(same.sum())
        total += len(ids)
        lr, lb = _log_softmax(ref), _log_softmax(got)
        top2 = np.sort(np.exp(lr), axis=-1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) >= DECISIVE_MARGIN
        agree_decisive += int(same[decisive].sum())
        n_decisive += int(decisive.sum())
        kl_sum += float((np.exp(lr) * (lr - lb)).sum())
        tgt = np.array(ids[1:])
        nll_ref -= float(lr[np.arange(len(tgt)), tgt].sum())
        nll_b -= float(lb[np.arange(len(tgt)), tgt].sum())
        n_pred += len(tgt)
    res.update(max_abs_diff=worst, logit_range=worst_range, tolerance=1e-3 * worst_range,
               top1_agreement=agree / total, kl_mean=kl_sum / total, decisive_tokens=n_decisive,
               top1_decisive=agree_decisive / n_decisive if n_decisive else None,
               ppl_ref=float(np.exp(nll_ref / n_pred)), ppl_bundle=float(np.exp(nll_b / n_pred)))
    res["ppl_ratio"] = res["ppl_bundle"] / res["ppl_ref"]
    prompt = seqs[0][:8]
    ref_gen = reference.generate(prompt, greedy_tokens)
    got_gen, speed = b.generate(prompt, greedy_tokens, stop_at_eos=False)
    res["greedy_identical"] = ref_gen == got_gen
    res["greedy_tokens"] = len(got_gen)
    res["speed"] = speed
    if quantized:
        th = thresholds or {}
        res["thresholds"] = th
        fails = []
        if n_decisive and res["top1_decisive"] < th.get("top1_min", 0.0):
            fails.append(f"top-1 agreement on decisive tokens {res['top1_decisive']:.3f} < {th['top1_min']}")
        if res["kl_mean"] > th.get("kl_max", float("inf")):
            fails.append(f"KL {res['kl_mean']:.4f} > {th['kl_max']}")
        if res["ppl_ratio"] > th.get("ppl_ratio_max", float("inf")):
            fails.append(f"perplexity ratio {res['ppl_ratio']:.3f} > {th['ppl_ratio_max']}")
        res["failures"] = fails
    else:
        fails = []
        if not ok_logits:
            fails.append(f"max |logit diff| {worst:.3g} > 1e-3 x logit range {worst_range:.3g}")
        if not res["greedy_identical"]:
            fails.append("greedy generations differ from the reference")
        res["failures"] = fails
    res["passed"] = not fails
    return res
