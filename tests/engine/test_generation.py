"""Generation behaves like users expect (issue 10, items 13, 14, 16, 17), on bundles of the embedded model.

- a prompt longer than the context is refused before anything is printed, with its real token count; prompt +
  --max-new-tokens beyond the context stops with "stopped: context full at N tokens" (run and the swappable
  runtime);
- EOS ends generation and is never printed;
- the stats line on stderr never glues onto the text when both streams share one pipe;
- `--pool auto` picks the same pool for the same prompt whatever is resident, and the held-out documents'
  own domain (accuracy measured against their labels).
Expected outputs come from an independent greedy loop over `StaticEngine.logits` (full recompute, no KV cache)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emo_edge.engine import Sampling, StaticEngine
from emo_edge.engine.sampler import run_generation
from emo_edge.data import task_items, heldout_texts
from emo_edge.errors import BundleError
from emo_edge.engine.swappable import SwappableEngine
from emo_edge.model.tokenizer import EOS, TextStream, TextTokenizer

ROOT = Path(__file__).resolve().parents[2]
CTX = 128


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          cwd=str(ROOT), **kw)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    static, swap = d / "static", d / "swap"
    for out, extra in ((static, ["--pools", "math", "--precision", "fp32"]),
                       (swap, ["--pools", "math,code,prose,chat", "--swappable", "--precision", "int4"])):
        r = cli("export", *extra, "--context", str(CTX), "--no-verify", "--out", str(out))
        assert r.returncode == 0, r.stderr
    return {"static": static, "swap": swap}


def greedy(b: StaticEngine, ids: list[int], n: int) -> tuple[list[int], bool]:
    """Independent greedy continuation: full forward each step; stops before EOS. Returns (new ids, hit EOS)."""
    seq = list(ids)
    while len(seq) - len(ids) < n and len(seq) < b.context:
        nxt = int(np.argmax(b.logits(seq)[-1]))
        if nxt == b.eos:
            return seq[len(ids):], True
        seq.append(nxt)
    return seq[len(ids):], False


def test_long_prompt_refused_before_printing(bundles):
    tok = TextTokenizer(bundles["static"] / "tokenizer.json")
    prompt = " ".join(heldout_texts("prose")[:3])
    n = len(tok.encode(prompt))
    assert n > CTX
    r = cli("run", str(bundles["static"]), "--prompt", prompt, "--max-new-tokens", "4")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert f"{n} tokens" in r.stderr and f"({CTX} tokens)" in r.stderr
    rt = SwappableEngine(bundles["swap"])
    with pytest.raises(BundleError, match=f"the prompt is {n} tokens"):
        rt.generate(prompt, pool="math", max_tokens=4)
    with pytest.raises(BundleError, match=f"the prompt is {n} tokens"):
        rt.generate(prompt, pool="auto", max_tokens=4)
    rt.close()


def test_context_full_stops_with_notice(bundles):
    b = StaticEngine(bundles["static"])
    text = heldout_texts("math")[0]
    ids = b.tokenizer.encode(text)[:CTX - 10]
    prompt = b.tokenizer.decode(ids)
    assert b.tokenizer.encode(prompt) == ids
    want, _ = greedy(b, ids, 40)
    r = cli("run", str(bundles["static"]), "--prompt", prompt, "--max-new-tokens", "40")
    assert r.returncode == 0, r.stderr
    assert f"stopped: context full at {CTX} tokens" in r.stderr
    assert r.stdout == prompt + b.tokenizer.decode(want) + "\n"
    assert len(want) == 10
    rt = SwappableEngine(bundles["swap"])
    res = rt.generate(ids, pool="math", max_tokens=40, ignore_eos=True)
    assert res.stop == "context" and res.total_tokens == CTX and len(res.ids) == 10
    res = rt.generate(ids, pool="math", max_tokens=3, ignore_eos=True)
    assert res.stop == "length" and len(res.ids) == 3
    rt.close()


def test_eos_ends_generation_and_is_never_printed(bundles):
    b = StaticEngine(bundles["static"])
    found = None
    for prompt in [i.prompt for i in task_items("equations")[:8]]:  # a worked solution ends its document
        ids = b.tokenizer.encode(prompt)
        if b.generate(ids, max_tokens=CTX).stop == "eos":
            found = ids
            break
    assert found, "no held-out prompt whose greedy continuation ends with EOS"
    ids = found
    want, eos = greedy(b, ids, CTX)
    assert eos
    prompt = b.tokenizer.decode(ids)
    r = cli("run", str(bundles["static"]), "--prompt", prompt, "--max-new-tokens", str(CTX - len(ids)))
    assert r.returncode == 0, r.stderr
    assert EOS not in r.stdout and "stopped: context" not in r.stderr
    text = prompt + b.tokenizer.decode(want)
    assert r.stdout == text + ("" if text.endswith("\n") else "\n")
    assert f"decode: {max(len(want) - 1, 0)} tokens" in r.stderr
    got = b.generate(ids, max_tokens=CTX)
    assert got.ids == want and got.stop == "eos"


def test_stats_line_never_glues_onto_text(bundles):
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "run", str(bundles["static"]), "--prompt",
                        "Compute 12 * 7.", "--max-new-tokens", "5"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    stats = [ln for ln in lines if "prefill:" in ln]
    assert len(stats) == 1 and stats[0].startswith("prefill: ") and lines[-1] == stats[0]
    assert r.stdout.startswith("Compute 12 * 7.")


class ScriptedSession:
    """A decode session whose logits follow a script: step i puts all mass on script[i]; holds `room` tokens
    after the prompt."""

    def __init__(self, script, room):
        self.script, self.room, self.step = script, room, 0

    def _logits(self):
        z = np.zeros((1, 10))
        z[0, self.script[self.step]] = 1.0
        return z

    def prefill(self, ids):
        return self._logits()

    def feed(self, ids):
        assert self.room > 0, "fed past the session's capacity"
        self.step, self.room = self.step + 1, self.room - 1
        return self._logits()


def test_decode_loop_stops():
    """EOS is neither returned nor passed on; a true on_token cancels; the session's room bounds the tokens."""
    eos, script = 0, [5, 6, 7, 0, 9]

    def run(n, room=10, on_token=None, eos=eos):
        c = run_generation(ScriptedSession(script, room), [1], Sampling(n), eos, on_token)
        return c.ids, c.stop

    seen: list[int] = []
    assert run(10, on_token=seen.append) == ([5, 6, 7], "eos") and seen == [5, 6, 7]
    assert run(10, on_token=lambda t: t == 6) == ([5, 6], "cancelled")
    assert run(10, room=2) == ([5, 6], "context")
    assert run(2, room=2) == ([5, 6], "length")
    assert run(5, eos=None) == (script, "length")
    c = run_generation(ScriptedSession(script, 10), [1], Sampling(5, ignore_eos=True), eos)
    assert c.ids == script and c.stop == "length"


def test_text_stream_holds_back_stop_strings(bundles):
    tok = TextTokenizer(bundles["static"] / "tokenizer.json")
    text = "Yes, a little less oil.\nUser: and then é"
    written: list[str] = []
    stream = TextStream(tok, written.append, stop=("\nUser:",))
    stops = [stream.push(t) for t in tok.encode(text)]
    assert stream.finish() == "Yes, a little less oil." == "".join(written)
    assert stops[-1] and not stops[0]
    written.clear()
    plain = TextStream(tok, written.append)
    for t in tok.encode("naïve café ✓"):
        plain.push(t)
        assert "\ufffd" not in "".join(written)
    assert plain.finish() == "naïve café ✓" == "".join(written)


PROMPTS = ["def f(x):", "The old house stood at the end of the road.", "What is 12 times 7?",
           "Solve for x: 3x + 5 = 20.", "for i in range(10):", "Hi! How are you today?"]


def test_auto_pool_same_whatever_came_before(bundles):
    rt = SwappableEngine(bundles["swap"])
    alone = {p: rt.choose_pool(rt.tokenizer.encode(p)) for p in PROMPTS}  # no pool loaded at all yet
    assert rt.active_name is None
    for resident in rt.pools:
        rt.use(resident)
        for p in PROMPTS:
            assert rt.choose_pool(rt.tokenizer.encode(p)) == alone[p], (resident, p)
    # the sequence: a code prompt first, then a prose prompt, through generate
    first = rt.generate("def f(x):", pool="auto", max_tokens=2)
    then = rt.generate(PROMPTS[1], pool="auto", max_tokens=2)
    assert first.pool == alone["def f(x):"][0] == "code"
    assert then.pool == alone[PROMPTS[1]][0] and "independent of the resident pool" in then.reason
    rt.close()


def test_auto_pool_accuracy_on_heldout(bundles):
    """The chooser against the held-out documents' domain labels: first 16 tokens of 8 documents per domain.
    (The bundle carries its pools' router profiles: nearest profile measured 32/32 on the annealed emo-tiny, where
    router-mass coverage, the chooser without profiles, got 24/32.)"""
    rt = SwappableEngine(bundles["swap"])
    assert rt.router_profiles() is not None and set(rt.router_profiles()) == set(rt.pools)
    hits = {}
    for dom in rt.pools:
        docs = heldout_texts(dom)[:8]
        hits[dom] = [rt.choose_pool(rt.tokenizer.encode(t)[:16])[0] == dom for t in docs]
    assert "closest router profile" in rt.choose_pool(rt.encode("Solve for x: 3x + 5 = 20."))[1]
    rt.close()
    acc = np.mean([h for v in hits.values() for h in v])
    assert acc >= 0.9, {d: np.mean(v) for d, v in hits.items()}
    assert all(np.mean(v) >= 0.75 for v in hits.values()), {d: np.mean(v) for d, v in hits.items()}


def test_closest_profile_by_hand():
    """Mean cosine over layers between the prompt's mean router probabilities and each pool's profile."""
    from emo_edge.engine.swappable.chooser import closest_profile

    probs = [np.array([[0.8, 0.2, 0.0], [0.6, 0.4, 0.0]]), np.array([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]])]
    # the prompt's means: [0.7, 0.3, 0] and [0, 0.5, 0.5]
    profiles = {"a": [np.array([1.0, 0, 0]), np.array([0, 1.0, 0])], "b": [np.array([0, 1.0, 0]), np.array([0, 0, 1.0])]}
    best, scores = closest_profile(probs, profiles)
    n = np.hypot(0.7, 0.3)
    want_a = (0.7 / n + 0.5 / np.hypot(0.5, 0.5)) / 2
    want_b = (0.3 / n + 0.5 / np.hypot(0.5, 0.5)) / 2
    assert best == "a" and np.isclose(scores["a"], want_a) and np.isclose(scores["b"], want_b)


def test_profiles_that_do_not_fit_the_bundle_are_one_line(bundles, tmp_path):
    import json
    import shutil

    from emo_edge.errors import BundleError

    bad = tmp_path / "swap"
    shutil.copytree(bundles["swap"], bad)
    m = json.loads((bad / "manifest.json").read_text())
    name = next(iter(m["swappable"]["profiles"]))
    m["swappable"]["profiles"][name] = m["swappable"]["profiles"][name][:-1]
    (bad / "manifest.json").write_text(json.dumps(m))
    rt = SwappableEngine(bad)
    with pytest.raises(BundleError, match=f"swappable.profiles.{name}"):
        rt.choose_pool(rt.encode("Solve for x: 3x + 5 = 20."))
    rt.close()


def test_pool_profiles_never_follow_a_calibration_name_out_of_the_builtin_folder(tmp_path):
    """A pool's provenance names its calibration files; a name that is a path (`../..`, `a/b`) or a file that is
    not ours means no profiles (the chooser falls back to coverage), and nothing outside the folder is read."""
    from types import SimpleNamespace

    from exporters.swappable import pool_profiles

    (tmp_path / "secret.jsonl").write_text('{"text": "x"}\n')
    for name in ("../../../../" + str(tmp_path / "secret.jsonl"), "a/b.jsonl", "..", "", "not-ours.jsonl"):
        pool = SimpleNamespace(name="p", calibration={"files": [{"name": name, "sha256": "0" * 64}]})
        assert pool_profiles(tmp_path / "no-bundle", [pool]) is None, name
