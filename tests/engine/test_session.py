"""The engine API: the decode session's shared past/present KV buffer against the copy-based decoder I/O run
through onnxruntime directly (bit for bit), capacity independence, in-place writes, the Concat-attention
fallback, and one API over static and swappable bundles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emo_edge.engine import Sampling, StaticEngine, SwappableEngine, open_engine
from emo_edge.engine.session import decoder_feed
from emo_edge.errors import PoolError

ROOT = Path(__file__).resolve().parents[2]
STEPS = [5, 17, 99, 3, 250, 42, 7]


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "-q", *args], capture_output=True, text=True,
                          cwd=str(ROOT))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, concat_bundle):
    d = tmp_path_factory.mktemp("engine")
    out = {}
    for name, extra in (("fp32", ["--precision", "fp32"]), ("int4", ["--precision", "int4"]),
                        ("swap", ["--pools", "math,code", "--swappable", "--precision", "int4"])):
        pools = [] if name == "swap" else ["--pools", "math"]
        r = cli("export", *pools, *extra, "--context", "64", "--no-verify", "--out", str(d / name))
        assert r.returncode == 0, r.stderr
        out[name] = d / name
    out["concat"] = concat_bundle
    return out


def copy_path_logits(eng: StaticEngine, prompt: list[int], steps: list[int]) -> list[np.ndarray]:
    """Independent of the session: onnxruntime's plain run with separate past and present tensors, each step's
    present fed back as the next past (what every runtime did before the shared buffer)."""
    sess = eng.session_
    names = [o.name for o in sess.get_outputs()]
    cache = [np.zeros((1, eng.kv_heads, 0, eng.head_dim), eng.kv_dtype)] * (2 * eng.n_layers)
    out = []
    for ids in [prompt] + [[t] for t in steps]:
        res = dict(zip(names, sess.run(None, decoder_feed(ids, cache, eng.context, eng.vocab_size, eng.n_layers))))
        cache = [res[f"present.{i}.{kv}"] for i in range(eng.n_layers) for kv in ("key", "value")]
        out.append(res["logits"][0].astype(np.float32))
    return out


@pytest.mark.parametrize("kind", ["fp32", "int4", "concat"])
def test_session_equals_the_copy_path_bit_for_bit(bundles, kind):
    eng = StaticEngine(bundles[kind])
    assert eng.kv_shared == (kind != "concat")
    prompt = [11, 12, 13, 14, 15, 16]
    want = copy_path_logits(eng, prompt, STEPS)
    for cap in (len(prompt) + len(STEPS), eng.token_limit):  # the buffer's size does not change a bit
        s = eng.session(cap)
        got = [s.feed(prompt)] + [s.feed([t]) for t in STEPS]
        for g, w in zip(got, want):
            assert np.array_equal(g, w)
        assert s.length == len(prompt) + len(STEPS)


def test_shared_buffer_is_written_in_place(bundles):
    """past and present are one buffer: the rows of the tokens held are written, the rest stay zero, and the
    arrays are the very ones bound (nothing was copied into a new present)."""
    eng = StaticEngine(bundles["int4"])
    s = eng.session(16)
    before = [a.__array_interface__["data"][0] for a in s.kv.arrays]
    s.prefill([5, 6, 7, 8])
    s.feed([9])
    assert [a.__array_interface__["data"][0] for a in s.kv.arrays] == before
    for a, v in zip(s.kv.arrays, s.kv.values):
        assert v.data_ptr() == a.__array_interface__["data"][0]
        assert np.abs(a[:, :, :5]).sum() > 0 and not a[:, :, 5:].any()
    with pytest.raises(Exception, match="capacity 16"):
        s.feed(list(range(20, 32)))


def test_generation_matches_an_independent_greedy_loop(bundles):
    eng = StaticEngine(bundles["int4"])
    prompt, seq = [5, 17, 99, 3], [5, 17, 99, 3]
    for _ in range(10):
        seq.append(int(np.argmax(copy_path_logits(eng, seq, [])[0][-1])))
    done = eng.generate(prompt, sampling=Sampling(10, ignore_eos=True))
    assert done.ids == seq[len(prompt):] and done.stop == "length" and done.decode_tokens == 9
    c = eng.generate(prompt, sampling=Sampling(1000, ignore_eos=True))
    assert c.stop == "context" and c.total_tokens == eng.token_limit


def test_one_api_over_static_and_swappable(bundles):
    st = open_engine(bundles["int4"])
    sw = open_engine(bundles["swap"], max_tokens=64)
    assert isinstance(st, StaticEngine) and isinstance(sw, SwappableEngine)
    assert st.pools == ["math"] and sorted(sw.pools) == ["code", "math"]
    assert st.use("math").noop and st.choose([5, 6]) == "math"
    with pytest.raises(PoolError, match="holds 'math'"):
        st.generate([5, 6], pool="code", max_tokens=2)
    for eng, pool in ((st, "auto"), (sw, "auto"), (sw, "code")):
        done = eng.generate([5, 17, 99], pool=pool, max_tokens=4, ignore_eos=True)
        assert len(done.ids) == 4 and done.pool in eng.pools
        assert set(eng.stats()) >= {"resident_experts", "rss", "peak_rss", "budget"}
    # the swappable engine's session under a pool equals its own logits (and so the static bundle of that pool)
    with sw.serving("math"):
        s = sw.session(8)
        got = s.feed([5, 17, 99])
    assert np.array_equal(got, sw.logits([5, 17, 99], pool="math"))
    sw.close()


def test_serve_runs_a_static_bundle_through_the_same_engine(bundles, tmp_path):
    """`emo-edge serve` on a static bundle: its one pool listed, auto resolves to it, the answer equals the
    engine's own greedy generation, another pool is a 400 naming it."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from test_serve import Server

    srv = Server(bundles["int4"], log=tmp_path / "serve.log")
    try:
        srv.wait_ready()
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=120, max_retries=0)
        name = bundles["int4"].name
        assert [m.id for m in client.models.list()] == [name, f"{name}:math"]
        eng = StaticEngine(bundles["int4"])
        want = eng.decode(eng.generate("1 + 2 =", max_tokens=6).ids)
        r = client.completions.create(model=name, prompt="1 + 2 =", max_tokens=6, temperature=0)
        assert r.choices[0].text == want
        assert r.model_extra["emo_edge"] == {"pool": "math", "swapped": False, "swap_ms": 0.0}
        with pytest.raises(openai.BadRequestError, match="math"):
            client.completions.create(model=f"{name}:code", prompt="x", max_tokens=2)
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_prefill_computes_the_last_logits_only(bundles, kind):
    """The graph's optional logits_to_keep input: unfed (onnxruntime-genai, optimum, `logits`) it keeps every
    position; the session's prefill asks for the last only, and gets the last row of the full run."""
    import onnx

    eng = StaticEngine(bundles[kind])
    g = onnx.load(str(bundles[kind] / "model.onnx"), load_external_data=False).graph
    assert "logits_to_keep" in {i.name for i in g.input} and "logits_to_keep" in {t.name for t in g.initializer}
    assert "logits_to_keep" not in {i.name for i in eng.session_.get_inputs()}  # optional: callers need not feed it
    prompt = [5, 17, 99, 3, 250, 42, 7, 11, 300, 2, 9]
    full = copy_path_logits(eng, prompt, [])[0]
    assert full.shape == (len(prompt), eng.vocab_size)
    s = eng.session(len(prompt))
    s.prefill_chunk = 4  # chunks 4 + 4 + 3: each returns one row
    last = s.prefill(prompt)
    assert last.shape == (1, eng.vocab_size)
    np.testing.assert_allclose(last[0], full[-1], rtol=0, atol=1e-4 * np.abs(full).max())
    np.testing.assert_array_equal(eng.session(len(prompt)).feed(prompt), eng.logits(prompt))  # all rows, unchanged
