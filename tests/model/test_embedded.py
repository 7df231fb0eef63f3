"""The embedded models: shipped pool catalogs are what discovery produces now, and the trained EMO keeps a
domain's quality inside a 25% pool where its standard-MoE twin does not (the project's central claim)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from emo_edge.model.checkpoint import CheckpointView
from emo_edge.model.locate import EMBEDDED
from emo_edge.pools.calib import read_documents
from emo_edge.pools.catalog import builtin_calib, discover_pool
from emo_edge.pools.discover import discover, doc_nll, pool_sizes
from emo_edge.model.reference import Reference
from emo_edge.model.tokenizer import load_tokenizer

MODELS = EMBEDDED.parent
DATA = Path(__file__).resolve().parents[2] / "emo_edge" / "data"


@pytest.mark.parametrize("model", ["emo-tiny", "stdmoe-tiny"])
def test_shipped_catalog_is_current(model):
    view = CheckpointView(MODELS / model)
    shipped = json.loads((MODELS / model / "emo_edge_pools" / "math.json").read_text())
    fresh = discover_pool(view, "math", [builtin_calib("math")], method="layerwise", fraction=0.25)
    assert shipped == json.loads(json.dumps(fresh.to_entry()))


def _ratio_at_quarter(model: str, domain: str) -> float:
    root = MODELS / model
    tok, ref = load_tokenizer(root), Reference(CheckpointView(root))
    calib, _ = read_documents(DATA / "calib" / f"{domain}.jsonl")
    heldout, _ = read_documents(DATA / "heldout" / f"{domain}.jsonl")
    cal = [tok.encode(t)[:512] for t in calib[:5]]
    ev = [tok.encode(t)[:256] for t in heldout[:12]]
    pool, _ = discover(ref, cal, "layerwise", pool_sizes(ref.spec, None, 0.25))
    (nll_full, n, _), (nll_pool, _, _) = doc_nll(ref, ev, [None, pool])
    return math.exp((nll_pool - nll_full) / n)


@pytest.mark.parametrize("domain", ["math", "code"])
def test_emo_pool_keeps_more_quality_than_standard_moe(domain):
    """A 25% pool costs the EMO little perplexity and its standard-MoE twin much more. Measured on the annealed
    models (2026-12-08): EMO 1.04 (math) and 1.11 (code) times the full model's perplexity, the twin 4.92 and
    2.28; the README's accuracy table says the same in points."""
    emo, std = _ratio_at_quarter("emo-tiny", domain), _ratio_at_quarter("stdmoe-tiny", domain)
    assert emo < 1.15, (emo, std)
    assert std - 1 > 5 * (emo - 1), (emo, std)  # the twin's perplexity excess is at least five times the EMO's


def test_committed_model_answers_held_out_tasks():
    """The embedded EMO answers its domains' exact-answer templates: greedy, deterministic, the first 50 held-out
    items of each family (never trained on: training drops every held-out prompt), full model, fp32 reference.
    The whole sets (200 each) are scored by `emo-edge eval --tasks math,code`; the model card has those numbers
    (100.0 / 96.5 / 90.5%; on these first 50: 100 / 96 / 92%). The floors are issue 21's targets for the full model
    (95 / 85 / 85%)."""
    from emo_edge.data import task_items
    from emo_edge.evaluate.report import score
    from emo_edge.evaluate.scorers import ReferenceScorer
    from emo_edge.evaluate.tasks import TaskSet

    scorer = ReferenceScorer(CheckpointView(EMBEDDED))
    got = {}
    for family in ("equations", "arithmetic", "code"):
        got[family] = score(scorer, TaskSet(family, tuple(task_items(family)[:50])), 160).accuracy
    assert got["equations"] >= 0.95 and got["arithmetic"] >= 0.85 and got["code"] >= 0.85, got
