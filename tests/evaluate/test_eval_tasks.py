"""`emo-edge eval --tasks`: extraction rules and multiple-choice scoring against hand-computed cases, the Wilson
interval against a textbook value, task-file validation as one line, the engine and the reference giving the
same greedy completions, and a budget sweep on the embedded model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from emo_edge.data import task_items
from emo_edge.data.tasks import TASK_FAMILIES, GENERATORS, heldout_tasks
from emo_edge.evaluate.report import Score, score, wilson
from emo_edge.evaluate.scorers import _logprob_sum, split_continuation
from emo_edge.evaluate.tasks import TaskItem, TaskSet, extract_answer, is_correct

from conftest import run_cli


@pytest.mark.parametrize("rule,text,want", [
    ("last_x", "Subtract 5: 3x = 15.\nDivide: x = 15 / 3 = 5.\nx = 5", "5"),
    ("last_x", "x = -3 first, then x=12", "12"),
    ("last_x", "no answer here, max = 4", None),
    ("last_x", "x = 07", "7"),
    ("last_int", "7 + 6 = 13. Digits: 3.\n347 + 286 = 633", "633"),
    ("last_int", "it is -14.", "-14"),
    ("last_int", "none", None),
    ("first_line", "  'ROSE'  \n>>> f(2)\n4", "'ROSE'"),
    ("first_line", "\nsecond", None),
])
def test_extraction_rules(rule, text, want):
    assert extract_answer(rule, text) == want


def test_is_correct_compares_integers_as_integers():
    item = TaskItem("What is 2 + 2?", answer="4", extract="last_int")
    assert is_correct(item, "2 + 2 = 04")
    assert not is_correct(item, "2 + 2 = 5")
    code = TaskItem(">>> f(1)\n", answer="[2, 4]", extract="first_line")
    assert is_correct(code, "[2, 4]\n>>> ")
    assert not is_correct(code, "[2,4]")


class _FixedScorer:
    """Log-likelihoods given by a table: the multiple-choice rule is checked against hand-picked answers."""

    def __init__(self, table):
        self.table = table

    def loglik(self, pairs):
        return [self.table[p] for p in pairs]


def test_multiple_choice_picks_the_highest_loglik_ties_to_lower_index():
    items = (TaskItem("Q1", choices=("a", "b", "c"), label=1),
             TaskItem("Q2", choices=("a", "b"), label=0),
             TaskItem("Q3", choices=("a", "b"), label=1))
    table = {("Q1", "a"): -3.0, ("Q1", "b"): -1.5, ("Q1", "c"): -2.0,  # b best: right
             ("Q2", "a"): -1.0, ("Q2", "b"): -1.0,  # tie: index 0 wins: right
             ("Q3", "a"): -0.5, ("Q3", "b"): -4.0}  # a best, label b: wrong
    s = score(_FixedScorer(table), TaskSet("mc", items), max_tokens=1)
    assert (s.n, s.correct) == (3, 2)


def test_logprob_sum_is_the_log_softmax_of_the_continuation():
    logits = np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0]], np.float32)
    # context of 1 token, continuation tokens [2, 0]: rows 0 and 1 predict them
    want = (2.0 - math.log(1 + math.e + math.e ** 2)) + (1.0 - math.log(3 * math.e))
    assert _logprob_sum(logits, 1, [2, 0]) == pytest.approx(want, abs=1e-9)


def test_continuation_split_follows_the_joint_encoding():
    class Chars:
        def encode(self, s):
            return [ord(c) for c in s]

    assert split_continuation(Chars(), "ab", "cd") == ([97, 98], [99, 100])


def test_wilson_interval_solves_the_score_equation():
    """Independently: the Wilson bounds are the p where the score statistic |k/n - p| / sqrt(p(1-p)/n) equals z
    (found here by bisection, not by the closed form)."""
    z = 1.959963984540054

    def root(k, n, a, b):
        f = lambda p: abs(k / n - p) - z * math.sqrt(p * (1 - p) / n)
        for _ in range(200):
            m = (a + b) / 2
            if (f(a) > 0) == (f(m) > 0):
                a = m
            else:
                b = m
        return (a + b) / 2

    for k, n in ((81, 263), (3, 40), (38, 40)):
        lo, hi = wilson(k, n)
        assert lo == pytest.approx(root(k, n, 1e-12, k / n), abs=1e-9)
        assert hi == pytest.approx(root(k, n, k / n, 1 - 1e-12), abs=1e-9)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert Score("t", 4, 3).to_json()["accuracy"] == 0.75


def test_builtin_task_sets_are_what_the_generators_write():
    for family in TASK_FAMILIES:
        items = task_items(family)
        assert [i.__dict__ for i in items] == [dict(TaskItem(**d).__dict__) for d in heldout_tasks(family, len(items))]
        assert len({i.prompt for i in items}) == len(items) >= 200


@pytest.mark.parametrize("family", TASK_FAMILIES)
def test_generated_answers_are_right(family):
    """The worked completions end in the answer an independent computation gives (Python evaluates the code)."""
    import random

    rng = random.Random(5)
    for _ in range(300):
        prompt, body, answer = GENERATORS[family](rng)
        if family == "equations":
            a, rest = prompt[len("Solve for x: "):].split("x ", 1)
            op, b, _, c = rest.rstrip(".").split()
            x = (int(c) - int(b)) / int(a) if op == "+" else (int(c) + int(b)) / int(a)
            assert int(answer) == x and extract_answer("last_x", body) == answer
        elif family == "arithmetic":
            expr = prompt[len("What is "):-1]
            assert str(eval(expr)) == answer == extract_answer("last_int", body)  # digits and + - * only
        else:
            lines = prompt.splitlines()
            scope: dict = {}
            exec(f"def {lines[0][len('>>> def '):]}\n    {lines[1][len('...     '):]}", scope)
            assert repr(eval(lines[3][len(">>> "):], scope)) == answer == body


def test_task_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "t.jsonl"
    cases = {
        '{"prompt": "q", "answer": "1"}\n': "no extraction rule",
        '{"prompt": "q", "choices": ["a", "b"], "label": 2}\n': "label 2",
        '{"prompt": "q", "answer": "1", "extract": "last_y"}\n': "extract",
        '{"prompt": "q", "answer": "1", "extract": "last_int"}\n{"prompt": "q", "choices": ["a", "b"], "label": 0}\n':
            "mixes",
        '[1]\n': "expected a JSON object",
        '{"prompt": "q", "answer": NaN}\n': "not valid JSON",
    }
    for text, needle in cases.items():
        bad.write_text(text)
        r = run_cli("eval", "--tasks", str(bad))
        assert r.returncode == 2, (text, r.stderr)
        assert r.stderr.count("\n") == 1 and needle in r.stderr and str(bad) in r.stderr, r.stderr
    r = run_cli("eval", "--tasks", "physics")
    assert r.returncode == 2 and "physics" in r.stderr


def test_engine_and_reference_give_the_same_completions(tmp_path):
    """An fp32 bundle through the engine and the PyTorch reference, restricted to the same pools, complete the
    held-out prompts identically (what `eval` scores on a bundle is the model it was exported from)."""
    out = tmp_path / "b"
    r = run_cli("export", "--pools", "all", "--precision", "fp32", "--out", str(out), "--no-verify")
    assert r.returncode == 0, r.stderr
    from emo_edge.model.checkpoint import CheckpointView
    from emo_edge.engine import open_engine
    from emo_edge.evaluate.scorers import EngineScorer, ReferenceScorer
    from emo_edge.model.locate import EMBEDDED

    items = [i for f in TASK_FAMILIES for i in task_items(f)[:6]]
    prompts, rules = [i.prompt for i in items], [i.extract for i in items]
    with open_engine(out) as eng:
        a = EngineScorer(eng).complete(prompts, rules, 96)
        la = EngineScorer(eng).loglik([(p, " 12") for p in prompts[:4]])
    ref = ReferenceScorer(CheckpointView(EMBEDDED))
    assert a == ref.complete(prompts, rules, 96)
    assert np.allclose(la, ref.loglik([(p, " 12") for p in prompts[:4]]), atol=1e-3)


def test_budget_sweep_on_the_embedded_model():
    r = run_cli("eval", "--tasks", "equations", "--limit", "6", "--budget", "100MB,1GB", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [row["config"] for row in rows] == ["full (fp32 reference)", "budget 100MB (math)", "budget 1GB (math)"]
    assert rows[1]["scores"] == {} and "does not fit" in rows[1]["note"]
    assert rows[2]["scores"]["equations"]["n"] == 6 and "experts" in rows[2]["note"]


def test_choice_scores_equal_an_independent_torch_computation():
    """Multiple-choice log-likelihoods through ReferenceScorer equal torch's log_softmax over one forward of
    prompt + choice (computed here without the scorer's helpers), on built-in chat items."""
    import torch

    from emo_edge.model.checkpoint import CheckpointView
    from emo_edge.evaluate.scorers import ReferenceScorer
    from emo_edge.model.locate import EMBEDDED
    from emo_edge.model.reference import Reference
    from emo_edge.model.tokenizer import load_tokenizer

    items = task_items("chat")[:3]
    view = CheckpointView(EMBEDDED)
    pairs = [(i.prompt, c) for i in items for c in i.choices]
    got = ReferenceScorer(view).loglik(pairs)
    ref, tok = Reference(view), load_tokenizer(EMBEDDED)
    for (ctx, cont), g in zip(pairs, got):
        a, whole = tok.encode(ctx), tok.encode(ctx + cont)
        assert whole[:len(a)] == a  # the chat prompts end at a token boundary
        logp = torch.log_softmax(ref.forward(torch.tensor([whole]))[0].double(), dim=-1)
        want = sum(float(logp[t - 1, whole[t]]) for t in range(len(a), len(whole)))
        assert g == pytest.approx(want, abs=1e-3)


def test_builtin_choice_sets_are_what_the_generators_write():
    from emo_edge.data.choice import CHOICE_FAMILIES, heldout_choice

    for family in CHOICE_FAMILIES:
        items = task_items(family)
        want = heldout_choice(family, len(items))
        assert [(i.prompt, list(i.choices), i.label) for i in items] == \
            [(d["prompt"], d["choices"], d["label"]) for d in want]
        assert all(len(i.choices) == 4 and 0 <= i.label < 4 for i in items)


def test_builtin_groups_expand_to_their_sets_with_their_domains():
    """`--tasks math,code,chat` names groups: math = equations + arithmetic (scored under the math pool), code,
    and a multiple-choice set (its own domain); each set once, in order."""
    from emo_edge.commands.eval_tasks import load_task_sets

    sets = load_task_sets("math,code,equations,chat", None, 3)
    assert [(ts.name, d, len(ts.items)) for ts, d in sets] == [
        ("equations", "math", 3), ("arithmetic", "math", 3), ("code", "code", 3), ("chat", "chat", 3)]
    r = run_cli("eval", "--tasks", "math,code", "--limit", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["rows"][0]["scores"]) == {"equations", "arithmetic", "code"}
