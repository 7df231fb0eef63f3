"""Retention: does a domain's expert pool keep its quality? EMO vs a standard MoE of the same shape.

For each domain and both embedded models (emo-tiny, trained with EMO's document-level pools, and stdmoe-tiny,
its token-level top-k twin: same shape, data, steps and seed), discover pools of 50%, 25% and 12.5% of the routed
experts from at most 5 calibration documents (layerwise method), then measure held-out perplexity of the full
model and of each pool-restricted model in one sweep. Prints one table of perplexity ratios (pool / full) and
draws the curves.

    python bench/retention.py [--plot bench/retention.png] [--calib-docs 5] [--eval-docs 32]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emo_edge.model.checkpoint import CheckpointView  # noqa: E402
from emo_edge.pools.calib import read_documents  # noqa: E402
from emo_edge.pools.discover import discover, doc_nll, pool_sizes  # noqa: E402
from emo_edge.model.reference import Reference  # noqa: E402
from emo_edge.model.tokenizer import load_tokenizer  # noqa: E402

DATA = ROOT / "emo_edge" / "data"
MODELS = {"EMO": ROOT / "emo_edge" / "models" / "emo-tiny", "StdMoE": ROOT / "emo_edge" / "models" / "stdmoe-tiny"}
DOMAINS = ("math", "code", "prose", "chat", "records")
FRACTIONS = (0.5, 0.25, 0.125)


def domain_texts(domain: str, calib_docs: int, eval_docs: int) -> tuple[list[str], list[str]]:
    """(calibration documents, held-out documents). records has no built-in calibration set: its first
    held-out documents calibrate and the rest are evaluated (disjoint)."""
    heldout, _ = read_documents(DATA / "heldout" / f"{domain}.jsonl")
    calib_path = DATA / "calib" / f"{domain}.jsonl"
    if calib_path.exists():
        calib, _ = read_documents(calib_path)
        return calib[:calib_docs], heldout[:eval_docs]
    return heldout[:calib_docs], heldout[calib_docs:calib_docs + eval_docs]


def measure(model_dir: Path, calib: list[str], heldout: list[str], max_tokens: int) -> dict:
    view = CheckpointView(model_dir)
    tok = load_tokenizer(model_dir)
    ref = Reference(view)
    cal_ids = [tok.encode(t)[:max_tokens] for t in calib]
    eval_ids = [ids for ids in (tok.encode(t)[:max_tokens] for t in heldout) if len(ids) > 1]
    pools = [discover(ref, cal_ids, "layerwise", pool_sizes(view.spec, None, f))[0] for f in FRACTIONS]
    results = doc_nll(ref, eval_ids, [None] + pools)
    ppl = [math.exp(nll / n) for nll, n, _ in results]
    return {"ppl_full": ppl[0], "ratios": [p / ppl[0] for p in ppl[1:]], "kl": [kl for _, _, kl in results[1:]],
            "calib_tokens": sum(map(len, cal_ids)), "eval_tokens": sum(len(d) - 1 for d in eval_ids)}


def plot(path: Path, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(3.2 * len(DOMAINS), 3.2), sharey=True)
    xs = [1.0, *FRACTIONS]
    for ax, domain in zip(axes, DOMAINS):
        for model, style in (("EMO", "-o"), ("StdMoE", "--s")):
            r = table[domain][model]
            ax.plot(xs, [1.0, *r["ratios"]], style, label=model)
        ax.set_xscale("log", base=2)
        ax.set_title(domain)
        ax.set_xlabel("fraction of experts kept")
        ax.axhline(1.0, color="grey", lw=0.7, ls=":")
    axes[0].set_ylabel("perplexity ratio (pool / full)")
    axes[0].legend()
    fig.suptitle("Pool retention: EMO vs standard MoE (pools from 5 documents)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-docs", type=int, default=5)
    ap.add_argument("--eval-docs", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--plot", default=str(ROOT / "bench" / "retention.png"))
    ap.add_argument("--json", help="Also write the numbers as JSON here.")
    args = ap.parse_args()
    t0 = time.perf_counter()
    table: dict = {}
    for domain in DOMAINS:
        calib, heldout = domain_texts(domain, args.calib_docs, args.eval_docs)
        table[domain] = {m: measure(p, calib, heldout, args.max_tokens) for m, p in MODELS.items()}
    head = ["domain", "model", "ppl full"] + [f"ratio @{f:g}" for f in FRACTIONS] + ["Std/EMO @0.25"]
    print(f"{head[0]:8s} {head[1]:7s} {head[2]:>9s} " + " ".join(f"{h:>11s}" for h in head[3:]))
    for domain in DOMAINS:
        emo, std = table[domain]["EMO"], table[domain]["StdMoE"]
        for name, r in (("EMO", emo), ("StdMoE", std)):
            cells = " ".join(f"{x:11.3f}" for x in r["ratios"])
            extra = f"{std['ratios'][1] / emo['ratios'][1]:11.3f}" if name == "StdMoE" else ""
            print(f"{domain:8s} {name:7s} {r['ppl_full']:9.3f} {cells} {extra}")
    wins = sum(table[d]["EMO"]["ratios"][1] < table[d]["StdMoE"]["ratios"][1] for d in DOMAINS)
    print(f"at 25% of experts EMO's ratio is closer to 1 on {wins}/{len(DOMAINS)} domains "
          f"(calibration: {args.calib_docs} docs per domain; {time.perf_counter() - t0:.0f} s)")
    if args.plot:
        plot(Path(args.plot), table)
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
