"""The prefix cache (engine/prefix.py): a prompt that starts with tokens a kept session holds prefills only the
rest, and generates exactly what a fresh session generates; sessions are kept per pool, bounded in bytes and
entries, cut back to the common prefix, and dropped for other pools before a swap. Checked against engines
without the cache (independent sessions) on bundles of the embedded model: a static fp32 bundle, the Concat
attention (unshared KV), and a swappable one."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_cli

from emo_edge.engine import Sampling, open_engine
from emo_edge.engine.prefix import MIN_REUSE, PrefixCache, common_prefix
from emo_edge.model.tokenizer import CHAT



def cli(*args):
    return run_cli("-q", *args)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, concat_bundle):
    d = tmp_path_factory.mktemp("prefix")
    out = {}
    for name, extra in (("fp32", ["--pools", "all", "--precision", "fp32"]),
                        ("swap", ["--pools", "math,code", "--swappable", "--precision", "int4"])):
        r = cli("export", *extra, "--context", "256", "--no-verify", "--out", str(d / name))
        assert r.returncode == 0, r.stderr
        out[name] = d / name
    out["concat"] = concat_bundle  # conftest: Concat attention, whose cache is replaced each step
    return out


def turns(eng, n: int, pool=None, max_tokens: int = 12) -> list:
    """A chat of `n` turns, each prompt the whole conversation so far (what `emo-edge chat` sends)."""
    conv, out = [], []
    for i in range(n):
        msg = ["How do I keep rice from getting sticky?", "Why is that?", "And for pasta?"][i % 3]
        ids = eng.encode(CHAT.render(conv + [(msg, None)]))
        done = eng.generate(ids, pool=pool, sampling=Sampling(max_tokens))
        out.append(done)
        conv.append((msg, eng.decode(done.ids).strip()))
    return out


@pytest.mark.parametrize("kind", ["fp32", "concat"])
def test_kept_session_generates_what_a_fresh_one_does(bundles, kind):
    with open_engine(bundles[kind]) as fresh, open_engine(bundles[kind]) as kept:
        cache = kept.keep_prefixes(kept.session_kv_bytes(kept.token_limit), max_entries=1)
        a, b = turns(fresh, 3), turns(kept, 3)
        assert [d.ids for d in a] == [d.ids for d in b]
        assert a[0].cached_tokens == b[0].cached_tokens == 0 and all(d.cached_tokens == 0 for d in a)
        for d in b[1:]:  # later turns prefill only what the kept session does not hold
            assert d.cached_tokens >= MIN_REUSE and d.prefill_tokens >= 1
        assert [d.total_tokens for d in a] == [d.total_tokens for d in b]
        st = cache.stats()
        assert st["hits"] == 2 and st["misses"] == 1 and st["entries"] == 1
        assert st["tokens_reused"] == sum(d.cached_tokens for d in b) and 0 < st["bytes"] <= st["max_bytes"]


def test_reused_logits_equal_a_fresh_session(bundles):
    """The cut-back session's next logits equal a fresh session's over the same tokens (fp32: to rounding)."""
    with open_engine(bundles["fp32"]) as eng:
        ids = eng.encode(CHAT.render([("How long should I boil an egg?", None)]))
        cache = PrefixCache(eng.session_kv_bytes(eng.token_limit))
        with eng.serving(None) as (name, _):
            s = eng.session()
            s.prefill(ids + [5, 6, 7, 8])
            cache.put(name, s, ids + [5, 6, 7, 8])
            other = ids + [9, 10]
            t, n = cache.take(name, other, len(other) + 4)
            assert t is s and n == len(ids) and s.length == len(ids)
            got = t.prefill(other[n:])
            want = eng.session(len(other)).prefill(other)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_bounds_pool_keys_and_lru():
    class KV:
        def __init__(self, n):
            self.capacity, self.resident_bytes = 100, n

    class S:
        def __init__(self, n, length):
            self.kv, self.length = KV(n), length

        def truncate(self, n):
            self.length = n

    c = PrefixCache(max_bytes=250, max_entries=2)
    held = list(range(40))
    c.put("math", S(100, 40), held)
    assert c.take("code", held + [1], 50) == (None, 0)  # another pool's keys and values are never used
    assert c.take("math", held[:5] + [99], 50) == (None, 0)  # common prefix below MIN_REUSE
    assert c.take("math", held, 101) == (None, 0)  # no room for the answer
    s, n = c.take("math", held, 50)  # the whole prompt held: the last token runs again, for its logits
    assert n == len(held) - 1 and s.length == n and c.stats()["entries"] == 0
    c.put("math", S(100, 40), held)
    c.put("code", S(100, 40), held)
    c.put("prose", S(100, 40), held)  # three entries: the least recently kept goes
    assert c.stats()["entries"] == 2 and c.take("math", held, 50) == (None, 0)
    c.put("big", S(300, 40), held)  # bigger than the whole cache: not kept
    assert c.stats()["entries"] == 2
    assert c.drop_other_pools("code") == 1 and c.stats()["entries"] == 1
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0


def test_swap_drops_other_pools_kept_sessions(bundles):
    with open_engine(bundles["swap"]) as eng:
        cache = eng.keep_prefixes(eng.session_kv_bytes(eng.token_limit) * 4)
        first = turns(eng, 2, pool="math", max_tokens=4)
        assert first[1].cached_tokens > 0 and cache.stats()["entries"] == 1
        turns(eng, 1, pool="code", max_tokens=4)  # the swap to code forgets math's session first
        assert cache.stats()["entries"] == 1 and cache.stats()["evictions"] >= 1
        again = turns(eng, 2, pool="math", max_tokens=4)
        assert again[0].cached_tokens == 0 and again[1].cached_tokens > 0
        with open_engine(bundles["swap"]) as fresh:
            assert [d.ids for d in again] == [d.ids for d in turns(fresh, 2, pool="math", max_tokens=4)]
