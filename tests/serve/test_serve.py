"""`emo-edge serve` (issue 11, the server): the scheduler's rule on a fake engine (deterministic), the HTTP layer
in-process on a fake engine (503 while loading, bearer key, error shapes), and the acceptance run: the official
`openai` client against a real `emo-edge serve` subprocess on a swappable bundle of the embedded model, under a
--budget that fits one pool but not all four (so swaps evict). Expected texts come from an independent greedy loop
(a full forward per step through the runtime's logits), expected auto pools from the runtime's own chooser."""

from __future__ import annotations

import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from emo_edge.errors import PoolError
from emo_edge.engine import Completion, Sampling, SwapStats
from emo_edge.serve.scheduler import Job, Scheduler, pick
from emo_edge.model.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "emo_edge" / "models" / "emo-tiny" / "tokenizer.json"
POOLS = ("math", "code", "prose", "chat")
STARTUP_S = 240  # a loaded 2-core machine: the server's imports + the bundle's first preparation


# ---- helpers shared with test_serve_browser.py ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one HTTP request."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    c.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


def serve_bundle(tmp_path_factory) -> Path:
    """A swappable int4 bundle of the embedded model with its four built-in pools, exported once per session."""
    out = tmp_path_factory.getbasetemp() / "serve-bundle"
    if not (out / "manifest.json").is_file():
        r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "-q", "export", "--pools", ",".join(POOLS),
                            "--swappable", "--precision", "int4", "--context", "1024", "--no-verify", "--out",
                            str(out)], capture_output=True, text=True, cwd=str(ROOT), timeout=600)
        assert r.returncode == 0, r.stderr
    return out


class Server:
    """`emo-edge serve BUNDLE --port P ARGS` in a subprocess; `stop()` always kills it."""

    def __init__(self, bundle: Path, *args: str, log: Path):
        self.port, self.log, self.bundle, self.bundle_name = free_port(), log, bundle, bundle.name
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", str(bundle), "--port",
                                      str(self.port), *args], stdout=subprocess.DEVNULL,
                                     stderr=open(log, "w"), cwd=str(ROOT))
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                status, body = call(self.port, "GET", "/health")
                if status == 200:
                    return body
                assert status == 503 and body["status"] == "loading", (status, body)
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"serve not ready after {STARTUP_S} s: {self.log.read_text()}")

    def metrics(self) -> dict:
        status, text = call(self.port, "GET", "/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- the scheduler on a fake engine ---------------------------------------------------------------------------
class FakeEngine:
    """Records what the scheduler makes it do; refuses to generate on a pool that is not resident."""

    name, pools, token_limit = "fake", ["a", "b", "c"], 64

    def __init__(self, resident: str | None = None):
        self.tokenizer = TextTokenizer(TOKENIZER)
        self.resident, self.swaps, self.served = resident, [], []

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def choose(self, ids):
        return self.pools[ids[0] % 3]

    def resident_pool(self):
        return self.resident

    def use(self, pool):
        if pool not in self.pools:
            raise PoolError(f"unknown pool '{pool}'")
        self.swaps.append(pool)
        self.resident = pool
        return SwapStats(pool=pool, seconds=0.0015)

    def generate(self, ids, pool, sampling, on_token):
        if pool != self.resident:
            raise AssertionError(f"generate on '{pool}' while '{self.resident}' is resident")
        self.served.append(ids[0])
        out = []
        for t in range(sampling.max_tokens):
            out.append(t + 300)
            if on_token(t + 300):
                return Completion(out, "cancelled", decode_s=0.01)
        return Completion(out, "length", decode_s=0.01)

    def stats(self):
        return {"resident_experts": 3, "rss": 0, "peak_rss": 0, "budget": None}

    def close(self):
        pass


def run_jobs(pools: list[str], k: int, grouping: bool, resident: str = "a") -> tuple[list[int], list[str]]:
    """Submit one job per entry of `pools` (job i has ids [i]) before the worker starts; (served order, swaps)."""
    eng = FakeEngine(resident)
    sched = Scheduler(eng, k=k, grouping=grouping, start=False)
    done = threading.Semaphore(0)
    for i, p in enumerate(pools):
        sched.submit(Job([i], p, Sampling(max_tokens=2), on_done=lambda g: done.release(),
                         on_error=lambda e: done.release()))
    sched.start()
    for _ in pools:
        assert done.acquire(timeout=30)
    sched.close()
    return eng.served, eng.swaps


def test_grouping_serves_the_resident_pool_first_within_the_aging_bound():
    mix = ["a", "b", "a", "b", "a", "b"]
    assert run_jobs(mix, k=10, grouping=True) == ([0, 2, 4, 1, 3, 5], ["b"])
    assert run_jobs(mix, k=10, grouping=False) == ([0, 1, 2, 3, 4, 5], ["b", "a", "b", "a", "b"])
    # k=1: job 1 (b) is passed over by job 2 once, then served next, and the b jobs follow on the resident pool
    assert run_jobs(mix, k=1, grouping=True) == ([0, 2, 1, 3, 5, 4], ["b", "a"])
    # k=0: never pass anyone over: FIFO
    assert run_jobs(mix, k=0, grouping=True)[0] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_no_job_waits_behind_more_than_k_later_arrivals(k):
    rng = random.Random(k)
    for _ in range(20):
        pools = [rng.choice("abc") for _ in range(rng.randint(1, 30))]
        served, swaps = run_jobs(pools, k=k, grouping=True)
        assert sorted(served) == list(range(len(pools)))
        fifo_swaps = len(run_jobs(pools, k=k, grouping=False)[1])
        for pos, job in enumerate(served):  # later arrivals served before this job
            assert sum(1 for j in served[:pos] if j > job) <= k, (pools, served)
        assert len(swaps) <= fifo_swaps


def test_jobs_submitted_from_many_threads_all_run_once_on_their_own_pool():
    eng = FakeEngine("a")
    sched = Scheduler(eng, k=3)
    results, lock = {}, threading.Lock()
    done = threading.Semaphore(0)

    def client(c: int):
        rng = random.Random(c)
        for i in range(25):
            jid, pool = c * 100 + i, rng.choice("abc")

            def finished(g, jid=jid, pool=pool):
                with lock:
                    results[jid] = (pool, eng.resident, len(g.ids))
                done.release()
            sched.submit(Job([jid], pool, Sampling(max_tokens=2), on_done=finished, on_error=lambda e: done.release()))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(150):
        assert done.acquire(timeout=30)
    sched.close()
    assert sorted(eng.served) == sorted(results) and len(results) == 150
    assert all(pool == resident and n == 2 for pool, resident, n in results.values())


def test_pick_is_pure_and_auto_pools_are_resolved_by_the_engine():
    jobs = [Job([i], p, Sampling(max_tokens=1)) for i, p in enumerate(["b", "a", "c"])]
    for i, j in enumerate(jobs):
        j.seq = i
    assert pick(jobs, "a", 2, True) is jobs[1] and pick(jobs, "a", 2, False) is jobs[0]
    jobs[2].passed = 2
    assert pick(jobs, "a", 2, True) is jobs[2]
    served, swaps = run_jobs([None, None, None, None], k=4, grouping=True, resident=None)  # auto: ids[0] % 3
    assert served == [0, 3, 1, 2] and swaps == ["a", "b", "c"]


def test_a_cancelled_job_stops_generating_and_a_failing_one_leaves_the_worker_serving():
    eng = FakeEngine("a")
    sched = Scheduler(eng, k=2)
    got: dict = {}
    ev = threading.Event()
    job = Job([1], "a", Sampling(max_tokens=50), on_done=lambda g: (got.update(done=g), ev.set()))
    job.on_token = lambda t: t == 305 and job.cancelled.set()  # the client goes away after the 6th token
    sched.submit(job)
    assert ev.wait(30) and got["done"].stop == "abandoned" and got["done"].ids == list(range(300, 307))
    ev.clear()
    sched.submit(Job([2], "nope", Sampling(max_tokens=1), on_error=lambda e: (got.update(err=e), ev.set())))
    assert ev.wait(30) and "unknown pool 'nope'" in str(got["err"])
    ev.clear()
    sched.submit(Job([3], "b", Sampling(max_tokens=3), on_done=lambda g: (got.update(last=g), ev.set())))
    assert ev.wait(30) and got["last"].ids == [300, 301, 302] and eng.resident == "b" and eng.served == [1, 3]
    sched.close()


# ---- the HTTP layer in-process, on the fake engine -------------------------------------------------------------
@pytest.fixture
def fake_server():
    """uvicorn in a thread serving the app over FakeEngine, whose loading waits for `release`; --api-key k3y."""
    import uvicorn

    from emo_edge.serve.app import ServerState, create_app

    release = threading.Event()

    def load():
        assert release.wait(60)
        return FakeEngine("a")

    state = ServerState(load, api_key="k3y", k=4, grouping=True, budget=None)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port, release
    release.set()
    server.should_exit = True
    t.join(timeout=30)


def test_health_is_503_while_loading_and_the_key_is_enforced(fake_server):
    port, release = fake_server
    key = {"Authorization": "Bearer k3y"}
    assert call(port, "GET", "/health") == (503, {"status": "loading"})
    status, body = call(port, "GET", "/v1/models", headers=key)
    assert status == 503 and body["error"]["code"] == "loading"
    release.set()
    deadline = time.monotonic() + 30
    while call(port, "GET", "/health")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert call(port, "GET", "/health")[1]["pools"] == ["a", "b", "c"]
    chat = {"model": "fake:b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k3y"}):
        status, body = call(port, "POST", "/v1/chat/completions", chat, headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key" and "Bearer" in body["error"]["message"]
    assert call(port, "GET", "/metrics")[0] == 401
    status, body = call(port, "POST", "/v1/chat/completions", chat, key)
    assert status == 200 and body["emo_edge"] == {"pool": "b", "swapped": True, "swap_ms": 1.5}
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["message"]["content"] == FakeEngine().decode([300, 301, 302]).lstrip()


def test_request_errors_are_openai_shaped_and_name_the_field(fake_server):
    port, release = fake_server
    release.set()
    key = {"Authorization": "Bearer k3y"}
    while call(port, "GET", "/health")[0] != 200:
        time.sleep(0.05)
    msgs = [{"role": "user", "content": "hi"}]
    cases = [  # (body or raw bytes, status, param, words in the message)
        (b"{not json", 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "expected a JSON object"),
        ({"model": "fake"}, 400, "messages", "field 'messages': field required"),
        ({"messages": msgs}, 400, "model", "field 'model'"),
        ({"model": "fake", "messages": msgs, "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 1"),
        ({"model": "fake", "messages": msgs, "max_tokens": 64}, 400, "max_tokens", "below the context (64"),
        ({"model": "fake", "messages": msgs, "temperature": float("nan")}, 400, None, "not valid JSON"),
        ({"model": "fake", "messages": msgs, "stop": ["1", "2", "3", "4", "5"]}, 400, "stop", "at most 4"),
        ({"model": "fake", "messages": [{"role": "user", "content": "word " * 80}]}, 400, "messages",
         "context holds 64 tokens"),
        ({"model": "fake", "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", "last message"),
        ({"model": "fake", "messages": msgs, "pool": "legal"}, 400, "pool", "pools: a, b, c"),
        ({"model": "fake:legal", "messages": msgs}, 400, "model", "unknown pool 'legal'"),
        ({"model": "gpt-4o", "messages": msgs}, 404, "model", "'fake:POOL'"),
    ]
    for body, status, param, words in cases:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got_status, got = call(port, "POST", "/v1/chat/completions", raw=raw, headers=key)
        assert got_status == status, (body, got)
        err = got["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (body, err)
        assert words in err["message"], (words, err["message"])
    assert call(port, "GET", "/v1/chat/completions", headers=key)[1]["error"]["message"] == \
        "GET /v1/chat/completions: Method Not Allowed"
    assert call(port, "GET", "/v2/nothing")[0] == 404
    status, body = call(port, "POST", "/v1/completions", {"model": "fake:c", "prompt": "x", "max_tokens": 2}, key)
    assert status == 200 and body["object"] == "text_completion" and body["emo_edge"]["pool"] == "c"


# ---- acceptance: the official openai client against `emo-edge serve` ----------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, budget): `emo-edge serve` with a --budget just over what one pool needs and below what all four
    need (as the server itself measured them in a probe run without a budget: backbone RSS + KV + activations +
    experts)."""
    bundle = serve_bundle(tmp_path_factory)
    logs = tmp_path_factory.mktemp("serve-logs")
    probe = Server(bundle, log=logs / "probe.log")
    try:
        mem = probe.wait_ready()["memory"]
    finally:
        probe.stop()
    # 0.5 MiB over one pool (start-up RSS varies by ~0.25 MiB between runs) and well below all four: about a
    # quarter of the 48 experts more that every pool together holds (the shared KV buffer leaves RSS below the
    # projection by about as much again, so a margin of half of them let all four fit)
    budget = mem["required_one_pool"] + min(1 << 19, (mem["required_all_pools"] - mem["required_one_pool"]) // 4)
    assert mem["required_one_pool"] < budget < mem["required_all_pools"]
    srv = Server(bundle, "--budget", str(budget), log=logs / "serve.log")
    try:
        health = srv.wait_ready()
        assert health["memory"]["budget"] == budget and health["memory"]["required_one_pool"] <= budget
        yield srv, budget
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference(served):
    from emo_edge.engine.swappable import SwappableEngine

    rt = SwappableEngine(served[0].bundle, max_tokens=1024)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", timeout=120, max_retries=0)


def greedy(rt, ids: list[int], pool: str, n: int) -> list[int]:
    """Independent of the server and of the engine's decode loop and sampler: argmax of each step of a decode
    session under `pool` (the session equals onnxruntime's copy-based decoder I/O bit for bit:
    tests/engine/test_session.py; with an fp16 KV cache a step's logits are not those of a full recompute, so this
    loop steps too)."""
    with rt.serving(pool):
        s = rt.session(len(ids) + n)
        logits, out = s.prefill(ids), []
        for _ in range(n):
            nxt = int(np.argmax(logits[-1]))
            if nxt == rt.eos:
                break
            out.append(nxt)
            if len(out) < n:
                logits = s.feed([nxt])
    return out


def test_models_list_the_bundle_and_its_pools(served, client):
    name = served[0].bundle.name
    assert [m.id for m in client.models.list()] == [name] + [f"{name}:{p}" for p in POOLS]


def test_completion_equals_an_independent_greedy_loop_on_the_pool_asked(served, client, reference):
    name, prompt = served[0].bundle.name, "def add(a, b):"
    want = reference.tokenizer.decode(greedy(reference, reference.tokenizer.encode(prompt), "code", 12))
    r = client.completions.create(model=f"{name}:code", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.model_extra["emo_edge"]["pool"] == "code"
    n = len(reference.tokenizer.encode(want))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(reference.tokenizer.encode(prompt)), n)
    # the same through the extra body field, and a stop string cuts the text before it
    r2 = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                   extra_body={"pool": "code"})
    assert r2.choices[0].text == want
    stop = want.strip()[3:6]
    r3 = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0, stop=[stop],
                                   extra_body={"pool": "code"})
    assert r3.choices[0].text == want[:want.index(stop)] and r3.choices[0].finish_reason == "stop"


def test_chat_streams_the_same_answer_with_usage_and_the_pool(served, client, reference):
    from emo_edge.model.tokenizer import CHAT

    name, msg = served[0].bundle.name, "Solve for x: 3x + 5 = 20."
    ids = reference.tokenizer.encode(CHAT.render([(msg, None)]))
    want_pool = reference.choose_pool(reference.tokenizer.encode(msg))[0]  # auto: chosen from the user's message
    text = reference.tokenizer.decode(greedy(reference, ids, want_pool, 16))
    cut = min([text.find(s) for s in CHAT.stop if s in text] or [len(text)])
    want = text[:cut].lstrip()  # the format's space after "Assistant:" is not the answer's; the answer is as generated
    whole = client.chat.completions.create(model=name, messages=[{"role": "user", "content": msg}], max_tokens=16,
                                           temperature=0)
    assert whole.choices[0].message.content == want and whole.model_extra["emo_edge"]["pool"] == want_pool
    chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": msg}],
                                                 max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and "".join(pieces) == want  # streamed, in several chunks
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    assert {c.model_extra["emo_edge"]["pool"] for c in chunks} == {want_pool}


def test_every_request_runs_on_its_pool_and_swaps_stay_in_the_budget(served, client, reference):
    srv, budget = served
    name = srv.bundle.name
    union = sum(len(L.ids) for L in reference.layers)
    seen = []
    for pool in ["math", "code", "prose", "chat", "math", "math", "code"]:
        r = client.chat.completions.create(model=f"{name}:{pool}", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=4, temperature=0.7, seed=3)
        info = r.model_extra["emo_edge"]
        assert info["pool"] == pool
        if seen:
            assert info["swapped"] == (pool != seen[-1]) and (info["swap_ms"] > 0) == info["swapped"]
        seen.append(pool)
    m = srv.metrics()
    assert m["emo_edge_swaps_total"] >= 5 and m["emo_edge_swap_seconds_count"] == m["emo_edge_swaps_total"]
    # the budget holds one pool, not all four: experts were evicted, and RSS never went above the budget
    assert 0 < m["emo_edge_resident_experts"] < union, (m, call(srv.port, "GET", "/health"))
    assert m["emo_edge_budget_bytes"] == budget and m["emo_edge_peak_rss_bytes"] <= budget
    assert m['emo_edge_requests_total{endpoint="chat.completions",status="200"}'] >= 7


def test_unknown_pool_is_a_400_naming_the_known_ones(served, client):
    openai = pytest.importorskip("openai")
    name = served[0].bundle.name
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"pool": "legal"})
    assert exc.value.body["param"] == "pool" and "math, code, prose, chat" in exc.value.body["message"]


def test_bad_requests_and_a_client_gone_mid_stream_leave_the_server_serving(served):
    srv, _ = served
    name = srv.bundle.name
    msgs = [{"role": "user", "content": "hi"}]
    for raw, param in ((b'{"model": ', None), (json.dumps({"model": name}).encode(), "messages"),
                       (json.dumps({"model": name, "messages": msgs, "max_tokens": -5}).encode(), "max_tokens"),
                       (json.dumps({"model": name, "messages": msgs, "max_tokens": 10 ** 6}).encode(), "max_tokens"),
                       (json.dumps({"model": name, "prompt": "word " * 1100}).encode(), "prompt")):
        path = "/v1/completions" if b'"prompt"' in raw else "/v1/chat/completions"
        status, body = call(srv.port, "POST", path, raw=raw)
        assert status == 400 and body["error"]["param"] == param, (raw[:60], body)
    before = srv.metrics()
    # a long generation (EOS ignored, llama.cpp's ignore_eos); read two events, then hang up
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    c.request("POST", "/v1/completions", json.dumps({"model": f"{name}:prose", "prompt": "Once upon a time",
                                                     "max_tokens": 1000, "stream": True, "ignore_eos": True}),
              {"Content-Type": "application/json"})
    resp = c.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: {")
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    deadline = time.monotonic() + 60
    while srv.metrics()["emo_edge_abandoned_requests_total"] == before["emo_edge_abandoned_requests_total"]:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.2)
    after = srv.metrics()
    assert after["emo_edge_generated_tokens_total"] - before["emo_edge_generated_tokens_total"] < 1000
    status, body = call(srv.port, "POST", "/v1/completions", {"model": f"{name}:math", "prompt": "1 + 1 =",
                                                              "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def test_command_errors_are_one_line(tmp_path_factory):
    bundle = serve_bundle(tmp_path_factory)

    def serve(*args):
        return subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", *args], capture_output=True, text=True,
                              cwd=str(ROOT), timeout=STARTUP_S)

    for args, words in (((str(bundle.parent / "none"),), "does not exist"),
                        ((str(bundle), "--budget", "50MB", "--port", "0"), "below the backbone"),
                        ((str(bundle), "--api-key", " "), "--api-key: empty")):
        r = serve(*args)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and last.startswith("error: ") and words in last, r.stderr
        assert "Traceback" not in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = serve(str(bundle), "--port", str(port))
    assert r.returncode == 2 and r.stderr.strip() == f"error: --port {port}: cannot listen on 127.0.0.1:{port} " \
                                                     f"(Address already in use)"


def test_a_prompt_that_extends_an_earlier_one_prefills_only_the_rest(served, client, reference):
    """The prefix cache: the second prompt starts with the first prompt and its answer, so only its new tokens
    are prefilled (usage.prompt_tokens_details.cached_tokens), the answer is still the independent greedy one,
    and /metrics counts the hit."""
    name = served[0].bundle.name
    first = "def scale(xs, k):"
    a = client.completions.create(model=f"{name}:code", prompt=first, max_tokens=8, temperature=0)
    second = first + a.choices[0].text + "\n\ndef shift(xs, k):"
    ids = reference.tokenizer.encode(second)
    want = reference.tokenizer.decode(greedy(reference, ids, "code", 8))
    b = client.completions.create(model=f"{name}:code", prompt=second, max_tokens=8, temperature=0)
    assert b.choices[0].text == want
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert b.usage.prompt_tokens == len(ids) and 8 <= cached < len(ids), b.usage
    metrics = urllib.request.urlopen(served[0].url + "/metrics", timeout=30).read().decode()
    hits = [ln for ln in metrics.splitlines() if ln.startswith("emo_edge_prefix_cache_hits ")]
    assert hits and float(hits[0].split()[1]) >= 1, hits
