"""Verification of a freshly built bundle against the reference restricted to the same experts.

fp32:      max |logit difference| <= 1e-3 x logit range on every held-out sequence, and identical greedy tokens.
quantized: top-1 agreement, KL(ref || bundle) and perplexity ratio against the fp32 reference, checked against
           the target's thresholds for the experts' precision.

Cost. The reference runs all held-out sequences in ONE sweep through the layers (each layer, and in streaming
mode each expert, is loaded once for all sequences, not once per sequence), then greedy decoding of the prompt.
How much is checked depends on the model's size (`verify_sample`):
- up to SMALL_MODEL_PARAMS parameters (the embedded emo-tiny, the synthetic test models): 8 sequences x 64 tokens
  and 32 greedy tokens, the sample the target's quantized thresholds were measured with (targets/*.json);
- larger models: the quantized check keeps that same logits sample (its thresholds are statistics of a sample
  of that size: fewer tokens would make them a different test), and greedy decoding is cut to 8 tokens (it is
  not gated for quantized bundles, and each reference step streams the whole head and the selected experts);
  the fp32 check (a worst-case bound on every token, not a statistic) uses 4 sequences x 32 tokens.
One progress bar covers all of it: reference layers, bundle sequences, greedy tokens of both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..engine import Sampling, StaticEngine
HELDOUT = Path(__file__).resolve().parents[1] / "data" / "heldout"

SMALL_MODEL_PARAMS = 100_000_000  # emo-tiny has 4.9M; the 14B-width slices start at ~1B
FULL_SAMPLE = {"sequences": 8, "length": 64, "greedy_tokens": 32}


# top-1 agreement is gated on *decisive* tokens only: where the reference's top-1 probability leads the runner-up
# by at least this much. Where the reference is nearly indifferent (flat logits, e.g. random synthetic weights),
# any quantization noise flips the argmax without changing the distribution; KL and perplexity ratio judge those.
DECISIVE_MARGIN = 0.2


def verify_sample(parameters: int, quantized: bool, n_seq: int | None = None) -> dict:
    """How many held-out sequences, tokens per sequence and greedy tokens to check, and why (see the module
    docstring). `n_seq` (tests, the swappable export) overrides the number of sequences."""
    if parameters <= SMALL_MODEL_PARAMS:
        sample, why = dict(FULL_SAMPLE), (f"full sample ({parameters / 1e6:.1f}M parameters <= "
                                          f"{SMALL_MODEL_PARAMS / 1e6:.0f}M)")
    elif quantized:
        sample = {**FULL_SAMPLE, "greedy_tokens": 8}
        why = (f"large model ({parameters / 1e9:.2f}B parameters): the thresholds' logits sample kept, greedy "
               f"check cut to 8 tokens")
    else:
        sample = {"sequences": 4, "length": 32, "greedy_tokens": 8}
        why = f"large model ({parameters / 1e9:.2f}B parameters): fp32 bound checked on a reduced sample"
    if n_seq is not None:
        sample["sequences"] = n_seq
    sample["parameters"] = int(parameters)
    sample["rule"] = why
    return sample


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


def reference_logits(reference, seqs: list[list[int]], on_layer=None) -> list[np.ndarray]:
    """The reference's logits of every sequence, from one sweep through the layers (see the module docstring)."""
    import torch

    from ..pools.discover import advance, start_states

    with torch.no_grad():
        states = start_states(reference, seqs)
        for i in range(reference.spec.num_layers):
            advance(reference.layer(i), states, reference.masks[i])
            if on_layer:
                on_layer()
        return [reference.head(s.h)[0].numpy() for s in states]


def verify(bundle_dir: Path, reference, tokenize, quantized: bool, thresholds: dict | None, n_seq: int | None = None,
           length: int | None = None, greedy_tokens: int | None = None, threads: int | None = None,
           progress: bool = True, parameters: int = 0) -> dict:
    from .. import progress as progress_out

    sample = verify_sample(parameters, quantized, n_seq)
    length = sample["length"] if length is None else length
    greedy_tokens = sample["greedy_tokens"] if greedy_tokens is None else greedy_tokens
    b = StaticEngine(bundle_dir, threads=threads, verify_files=False)
    seqs = heldout_sequences(tokenize, b.vocab_size, sample["sequences"],
                             min(length, b.context - greedy_tokens - 1))
    sample.update(sequences=len(seqs), length=length, greedy_tokens=greedy_tokens)
    sample["text"] = (f"{len(seqs)} held-out sequences of <= {length} tokens, {greedy_tokens} greedy tokens; "
                      f"{sample['rule']}")
    res = {"mode": "quantized" if quantized else "fp32", "sequences": len(seqs), "tokens": sum(map(len, seqs)),
           "sample": sample}
    L = reference.spec.num_layers
    bar = (progress_out.bar(L + len(seqs) + 2 * greedy_tokens, "verify", "step") if progress
           else progress_out._Silent())
    try:
        bar.set_postfix_str("reference")
        refs = reference_logits(reference, seqs, on_layer=lambda: bar.update(1))
        bar.set_postfix_str("bundle")
        stats = _compare(b, seqs, refs, on_seq=lambda: bar.update(1))
        res.update(stats)
        bar.set_postfix_str("greedy")

        def tick(_token) -> None:  # returns None: a true value would stop the bundle's generation
            bar.update(1)

        prompt = seqs[0][:8]
        ref_gen = reference.generate(prompt, greedy_tokens, on_token=tick)
        got = b.generate(prompt, sampling=Sampling(greedy_tokens, ignore_eos=True), on_token=tick)
        got_gen, speed = got.ids, got.timings()
    finally:
        bar.close()
    res["greedy_identical"] = ref_gen == got_gen
    res["greedy_tokens"] = len(got_gen)
    res["speed"] = speed
    return _judge(res, quantized, thresholds)


def _compare(b, seqs, refs, on_seq=None) -> dict:
    """Bundle logits of each sequence against the reference's: the statistics `_judge` checks."""
    worst, worst_range, ok_logits = 0.0, 0.0, True
    agree = total = 0
    agree_decisive = n_decisive = 0
    kl_sum = nll_ref = nll_b = 0.0
    n_pred = 0
    for ids, ref in zip(seqs, refs):
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
        if on_seq:
            on_seq()
    res = dict(max_abs_diff=worst, logit_range=worst_range, tolerance=1e-3 * worst_range,
               top1_agreement=agree / total, kl_mean=kl_sum / total, decisive_tokens=n_decisive,
               top1_decisive=agree_decisive / n_decisive if n_decisive else None,
               ppl_ref=float(np.exp(nll_ref / n_pred)), ppl_bundle=float(np.exp(nll_b / n_pred)),
               logits_ok=ok_logits)
    res["ppl_ratio"] = res["ppl_bundle"] / res["ppl_ref"]
    return res


def _judge(res: dict, quantized: bool, thresholds: dict | None) -> dict:
    ok_logits = res.pop("logits_ok")
    if quantized:
        th = thresholds or {}
        res["thresholds"] = th
        fails = []
        if res["decisive_tokens"] and res["top1_decisive"] < th.get("top1_min", 0.0):
            fails.append(f"top-1 agreement on decisive tokens {res['top1_decisive']:.3f} < {th['top1_min']}")
        if res["kl_mean"] > th.get("kl_max", float("inf")):
            fails.append(f"KL {res['kl_mean']:.4f} > {th['kl_max']}")
        if res["ppl_ratio"] > th.get("ppl_ratio_max", float("inf")):
            fails.append(f"perplexity ratio {res['ppl_ratio']:.3f} > {th['ppl_ratio_max']}")
    else:
        fails = []
        if not ok_logits:
            fails.append(f"max |logit diff| {res['max_abs_diff']:.3g} > 1e-3 x logit range {res['logit_range']:.3g}")
        if not res["greedy_identical"]:
            fails.append("greedy generations differ from the reference")
    res["failures"] = fails
    res["passed"] = not fails
    return res
