"""The server's request guard (issue 23 items 2-4): Host names (DNS rebinding), cross-site origins and content
types, body sizes refused before they are read, bodies in flight bounded, a vanished client not an error, and the
API key kept out of the command line. Over real HTTP against uvicorn serving the app on a fake engine."""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import threading
import time

import pytest

from conftest import run_cli
from test_serve import FakeEngine, call, free_port

KEY = {"Authorization": "Bearer k3y"}
CHAT = {"model": "fake:a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def guarded():
    """uvicorn in a thread: the app on a loaded FakeEngine, --api-key k3y, --allow-origin http://ok.example."""
    import uvicorn

    from emo_edge.serve.app import ServerState, create_app

    state = ServerState(lambda: FakeEngine("a"), api_key="k3y", k=4, grouping=True, budget=None)
    port = free_port()
    app = create_app(state, "127.0.0.1", allow_origins=["http://ok.example"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while call(port, "GET", "/health")[0] != 200 if server.started else True:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield port, state
    server.should_exit = True
    t.join(timeout=30)


def _raw(port: int, request: bytes, close_early: bool = False) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        if close_early:
            return 0, b""
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    break
    return int(data.split(b" ", 2)[1]), data


def test_host_must_name_this_server(guarded):
    port, _ = guarded
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.2"):
        status, body = call(port, "GET", "/health", headers={"Host": host})
        assert status == 421 and body["error"]["code"] == "host_not_allowed", (host, status, body)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert call(port, "GET", "/health", headers={"Host": host})[0] == 200


def test_cross_site_requests_are_refused(guarded):
    port, _ = guarded
    # the request a page on any site can send without a CORS preflight: a text/plain POST
    status, body = call(port, "POST", "/v1/chat/completions", raw=b'{"model": "fake"}',
                        headers={"Content-Type": "text/plain", **KEY})
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"
    status, body = call(port, "POST", "/v1/chat/completions", CHAT, {"Origin": "http://evil.example", **KEY})
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    # the server's own page (same origin) and an allowed origin work; the allowed one gets CORS headers
    assert call(port, "POST", "/v1/chat/completions", CHAT, {"Origin": f"http://127.0.0.1:{port}", **KEY})[0] == 200
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("OPTIONS", "/v1/chat/completions", headers={"Origin": "http://ok.example",
                                                          "Access-Control-Request-Method": "POST"})
    r = c.getresponse()
    r.read()
    assert r.status == 204 and r.getheader("access-control-allow-origin") == "http://ok.example"
    c.request("POST", "/v1/chat/completions", body=__import__("json").dumps(CHAT),
              headers={"Origin": "http://ok.example", "Content-Type": "application/json", **KEY})
    r = c.getresponse()
    r.read()
    assert r.status == 200 and r.getheader("access-control-allow-origin") == "http://ok.example"
    c.close()


def test_oversized_bodies_are_refused_before_they_are_read(guarded):
    port, state = guarded
    # a declared 200 MB body: answered 413 at once, with not one body byte sent
    t0 = time.monotonic()
    status, _ = _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                           b"application/json\r\nContent-Length: 200000000\r\nAuthorization: Bearer k3y\r\n\r\n")
    assert status == 413 and time.monotonic() - t0 < 10
    # a chunked body is stopped once it passes the limit
    chunk = b"a" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(40)) + b"0\r\n\r\n"
    status, _ = _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                           b"application/json\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer k3y\r\n\r\n" + body)
    assert status == 413
    assert call(port, "GET", "/health")[0] == 200


def test_a_client_that_leaves_before_its_body_is_not_an_error(guarded):
    port, _ = guarded
    _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: 5000\r\nAuthorization: Bearer k3y\r\n\r\n{\"mo", close_early=True)
    time.sleep(1.0)
    status, text = call(port, "GET", "/metrics", headers=KEY)
    assert status == 200
    errors = [line for line in text.splitlines() if line.startswith("emo_edge_requests_total") and '"500"' in line]
    assert not errors, errors


def test_bodies_in_flight_are_bounded():
    """Two requests whose declared bodies together pass the in-flight bound: the second is 503 with Retry-After
    while the first is still being received."""
    from emo_edge.serve.guard import Guard

    first_reading = asyncio.Event()
    release = asyncio.Event()

    async def app(scope, receive, send):
        first_reading.set()
        await release.wait()
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = Guard(app, None, max_body=1000, max_inflight=1500)

    def scope(n):
        return {"type": "http", "method": "POST", "path": "/v1/completions",
                "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                            (b"content-length", str(n).encode())]}

    async def run():
        sent: list[list] = [[], []]

        async def receive():
            return {"type": "http.request", "body": b"x" * 900, "more_body": False}

        def sender(i):
            async def send(msg):
                sent[i].append(msg)
            return send

        t1 = asyncio.create_task(guard(scope(900), receive, sender(0)))
        await first_reading.wait()
        await guard(scope(900), receive, sender(1))
        release.set()
        await t1
        return sent

    sent = asyncio.run(run())
    assert sent[0][0]["status"] == 200
    assert sent[1][0]["status"] == 503 and (b"retry-after", b"1") in sent[1][0]["headers"]
    assert guard.inflight == 0


def test_api_key_from_env_or_a_private_file(tmp_path, monkeypatch):
    from emo_edge.commands.serve import resolve_api_key
    from emo_edge.errors import EmoEdgeError

    monkeypatch.setenv("EMO_EDGE_API_KEY", "s3cret")
    assert resolve_api_key(None, None) == "s3cret"
    with pytest.raises(EmoEdgeError, match="given twice"):
        resolve_api_key("other", None)
    monkeypatch.delenv("EMO_EDGE_API_KEY")
    f = tmp_path / "key"
    f.write_text("filek3y\n")
    os.chmod(f, 0o600)
    assert resolve_api_key(None, str(f)) == "filek3y"
    os.chmod(f, 0o644)
    with pytest.raises(EmoEdgeError, match="readable by others"):
        resolve_api_key(None, str(f))
    r = run_cli("serve", str(tmp_path), "--api-key-file", str(f))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "readable by others" in r.stderr
