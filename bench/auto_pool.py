"""How well `--pool auto` picks the pool of a prompt's domain, and whether history changes the pick.

Builds a swappable int4 bundle of the embedded model (pools math, code, prose, chat) unless --bundle is given,
then, for the held-out documents of each domain (emo_edge/data/heldout/*.jsonl, never used for training or
calibration) cut to their first N tokens, asks each chooser for a pool and counts how often it is the document's
own domain:

  backbone     the runtime's chooser: router-mass coverage, routers probed with the backbone and the shared
               experts only (independent of the resident pool)
  active:P     the old chooser: the same score, routers probed through the resident pool P (P = each pool in
               turn); "history-dependent" counts the documents whose pick changes with P
  likelihood   the pool under which the prompt's own tokens are most likely (mean NLL, one forward per pool)

    python bench/auto_pool.py [--bundle DIR] [--lengths 8,32,128] [--docs N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emo_edge.data import heldout_texts  # noqa: E402
from emo_edge.engine.swappable import SwappableEngine  # noqa: E402

PROMPTS = ["What is 12 times 7?", "What is 15% of 80?", "Solve for x: 3x + 5 = 20.", "def f(x):",
           "for i in range(10):", "The old house stood at the end of the road.", "Hi! How are you today?"]


def prompt_nll(rt: SwappableEngine, ids: list[int], pool: str) -> float:
    """Mean negative log-likelihood (nats) of ids[1:] given the prefix, under `pool`."""
    z = rt.logits(ids, pool=pool).astype(np.float64)[:-1]  # (T-1, V)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def by_likelihood(rt: SwappableEngine, ids: list[int]) -> str:
    nll = {name: prompt_nll(rt, ids, name) for name in rt.pools}
    return min(nll, key=nll.get)


def picks(rt: SwappableEngine, ids: list[int]) -> dict[str, str]:
    out = {"backbone": rt.choose_pool(ids)[0]}
    for resident in rt.pools:
        rt.use(resident)
        out[f"active:{resident}"] = rt.choose_pool(ids, probe="active")[0]
    if len(ids) > 1:
        out["likelihood"] = by_likelihood(rt, ids)
    return out


def build_bundle(out: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "export", "--pools", "math,code,prose,chat", "--swappable",
                    "--precision", "int4", "--context", "256", "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="swappable bundle (default: build one of the embedded model)")
    ap.add_argument("--lengths", default="8,32,128", help="prompt lengths in tokens (first N of each document)")
    ap.add_argument("--docs", type=int, default=0, help="documents per domain (0 = all)")
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    os.environ.setdefault("EMO_EDGE_HOME", str(Path(tmp.name) / "home"))
    bundle = Path(a.bundle) if a.bundle else build_bundle(Path(tmp.name) / "bundle")
    rt = SwappableEngine(bundle)
    domains = list(rt.pools)
    print(f"bundle {bundle}: pools {', '.join(domains)}")
    print("| prompt tokens | chooser | " + " | ".join(domains) + " | all | history-dependent |")
    print("|---|---|" + "---|" * (len(domains) + 2))
    for n in [int(x) for x in a.lengths.split(",")]:
        hits: dict[str, dict[str, list[bool]]] = {}
        moved = []
        for dom in domains:
            docs = heldout_texts(dom)[:a.docs or None]
            for text in docs:
                got = picks(rt, rt.tokenizer.encode(text)[:n])
                for chooser, pool in got.items():
                    hits.setdefault(chooser, {}).setdefault(dom, []).append(pool == dom)
                moved.append(len({v for k, v in got.items() if k.startswith("active:")}) > 1)
        for chooser, per in hits.items():
            allhits = [h for v in per.values() for h in v]
            dep = f"{np.mean(moved):.1%}" if chooser.startswith("active:") else "0 (by construction)" \
                if chooser != "likelihood" else "0 (pool logits equal the static bundle's)"
            print(f"| {n} | {chooser} | " + " | ".join(f"{np.mean(per[d]):.1%}" for d in domains)
                  + f" | {np.mean(allhits):.1%} | {dep} |")
    print()
    print("| prompt | backbone | likelihood | " + " | ".join(f"active:{d}" for d in domains) + " |")
    print("|---|---|---|" + "---|" * len(domains))
    for p in PROMPTS:
        got = picks(rt, rt.tokenizer.encode(p))
        print(f"| {p} | {got['backbone']} | {got.get('likelihood', '-')} | "
              + " | ".join(got[f"active:{d}"] for d in domains) + " |")
    rt.close()


if __name__ == "__main__":
    main()
