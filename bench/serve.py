"""Load on `emo-edge serve`: N concurrent clients (the official openai client, streaming) over a mix of domains,
each request naming its pool, for a fixed time; the same mix with the scheduler's pool grouping on and off
(`--no-pool-grouping`: FIFO), side by side in one table.

    python bench/serve.py BUNDLE [--clients 16] [--seconds 60] [--budget 2GB] [--max-tokens 32]

Without --budget, a probe server measures what one pool and all pools need and the budget is set just over one
pool (1 MiB, or half the difference if smaller), so swaps must evict. Every response's `emo_edge.pool` is checked
against the pool it asked for; the server's RSS is sampled every 0.1 s from /proc and its VmHWM read at the end.
Requests generate exactly --max-tokens tokens (`ignore_eos`), so both runs do the same work per request.

`--attack N`: N more threads send what the request guard must refuse while the clients run (declared 200 MB
bodies, chunked bodies past the limit, cross-site text/plain POSTs, foreign Host and Origin headers, clients that
leave before their body); each answer is counted by status, and any that is not a refusal (or a 200 to a hostile
request) is an attack that got through."""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {
    "math": ["Solve for x: 3x + 5 = 20.", "What is 12 times 7?", "Simplify (2x + 4) / 2."],
    "code": ["Write a Python function that reverses a list.", "def add(a, b):", "Fix this loop: for i in range(n) print(i)"],
    "prose": ["Describe a quiet morning by the sea.", "Once upon a time", "The old house at the end of the street"],
    "chat": ["How long should I boil an egg?", "Any tips for sleeping better?", "What should I pack for a hike?"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def start(bundle: str, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", bundle, "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"serve exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if get(url + "/health")[0] == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit("serve did not become ready in 300 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def metrics(url: str) -> dict:
    out = {}
    for line in get(url + "/metrics")[1].splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def probe_budget(bundle: str) -> int:
    proc, url = start(bundle)
    try:
        mem = json.loads(get(url + "/health")[1])["memory"]
    finally:
        stop(proc)
    one, every = mem["required_one_pool"], mem["required_all_pools"]
    return one + min(1 << 20, (every - one) // 2)


def client_loop(url: str, model: str, pools: list[str], seed: int, until: float, max_tokens: int, out: list):
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
    rng = random.Random(seed)
    while time.monotonic() < until:
        pool = rng.choice(pools)
        prompt = rng.choice(PROMPTS.get(pool, sum(PROMPTS.values(), [])))
        rec = {"pool": pool, "error": None, "ttft": None, "tokens": 0, "got": None}
        t0 = time.perf_counter()
        try:
            for ch in c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0.8, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"pool": pool, "ignore_eos": True}):
                rec["got"] = (ch.model_extra or {}).get("emo_edge", {}).get("pool", rec["got"])
                if rec["ttft"] is None and ch.choices and ch.choices[0].delta.content:
                    rec["ttft"] = time.perf_counter() - t0
                if ch.usage:
                    rec["tokens"] = ch.usage.completion_tokens
        except Exception as exc:  # noqa: BLE001 - counted, the load goes on
            rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["total"] = time.perf_counter() - t0
        out.append(rec)


ATTACKS = ("huge_length", "chunked_flood", "text_plain", "foreign_host", "foreign_origin", "leave_early")


def got_through(status) -> bool:
    """An attack got through when it was served (2xx) or broke something (5xx other than a 503 'busy')."""
    return isinstance(status, int) and (200 <= status < 300 or (status >= 500 and status != 503))


def _attack_once(port: int, kind: str) -> int | None:
    """One hostile request over a raw socket; the status the server answered (None: none expected/read)."""
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    if kind == "huge_length":
        req = (head + "Content-Type: application/json\r\nContent-Length: 200000000\r\n\r\n").encode()
    elif kind == "chunked_flood":
        chunk = b"a" * 65536
        req = (head + "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + \
            b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(48)) + b"0\r\n\r\n"
    elif kind == "text_plain":
        req = (head + f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    elif kind == "foreign_host":
        req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: attacker.example\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    elif kind == "foreign_origin":
        req = (head + f"Origin: http://attacker.example\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    else:  # leave_early
        req = (head + "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"mo").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(req)
        except OSError:  # the server may answer and close before a flood is sent: that is a refusal
            pass
        if kind == "leave_early":
            return None
        try:
            data = s.recv(4096)
        except OSError:
            return None
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def attack_loop(port: int, seed: int, until: float, out: list) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        kind = rng.choice(ATTACKS)
        try:
            out.append((kind, _attack_once(port, kind)))
        except OSError as exc:
            out.append((kind, f"{type(exc).__name__}"))
        time.sleep(0.05)


def sample_rss(pid: int, stop_at: threading.Event, peak: list) -> None:
    while not stop_at.is_set():
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except OSError:
            return
        stop_at.wait(0.1)


def run(bundle: str, budget: int, grouping: bool, clients: int, seconds: float, max_tokens: int,
        attackers: int = 0) -> dict:
    proc, url = start(bundle, "--budget", str(budget), *([] if grouping else ["--no-pool-grouping"]))
    try:
        health = json.loads(get(url + "/health")[1])
        model, pools = health["model"], list(health["pools"])
        before, recs, peak, done = metrics(url), [], [0], threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, done, peak), daemon=True)
        sampler.start()
        t0 = time.monotonic()
        threads = [threading.Thread(target=client_loop, args=(url, model, pools, i, t0 + seconds, max_tokens, recs))
                   for i in range(clients)]
        attacks: list = []
        port = int(url.rsplit(":", 1)[1])
        threads += [threading.Thread(target=attack_loop, args=(port, 1000 + i, t0 + seconds, attacks))
                    for i in range(attackers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        done.set()
        after = metrics(url)
    finally:
        stop(proc)
    ok = [r for r in recs if r["error"] is None]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    total = [r["total"] for r in ok]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {"requests/s": len(ok) / wall, "tokens/s": sum(r["tokens"] for r in ok) / wall,
            "TTFT p50 (s)": pct(ttft, 50), "TTFT p99 (s)": pct(ttft, 99),
            "latency p50 (s)": pct(total, 50), "latency p99 (s)": pct(total, 99),
            "swaps/min": (after["emo_edge_swaps_total"] - before["emo_edge_swaps_total"]) / wall * 60,
            "errors": len(recs) - len(ok), "wrong pool": sum(1 for r in ok if r["got"] != r["pool"]),
            "peak RSS sampled (MiB)": peak[0] / 2**20, "peak RSS VmHWM (MiB)": after["emo_edge_peak_rss_bytes"] / 2**20,
            "budget (MiB)": budget / 2**20, "attacks sent": len(attacks),
            "attacks through": sum(1 for _, st in attacks if got_through(st)),
            "_errors": [r["error"] for r in recs if r["error"]][:3],
            "_through": [(k, st) for k, st in attacks if got_through(st)][:5]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--budget", default=None, help="e.g. 2GB; default: just over one pool (probed)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--attack", type=int, default=0, help="threads sending hostile requests meanwhile")
    a = ap.parse_args()
    from emo_edge.units import parse_size

    budget = parse_size(a.budget, "--budget") if a.budget else probe_budget(a.bundle)
    on = run(a.bundle, budget, True, a.clients, a.seconds, a.max_tokens, a.attack)
    off = run(a.bundle, budget, False, a.clients, a.seconds, a.max_tokens, a.attack)
    print(f"bench/serve.py: {a.bundle}, {a.clients} clients x {a.seconds:.0f} s, {a.max_tokens} tokens/request, "
          f"budget {budget / 2**20:.1f} MiB")
    print(f"| {'':<24} | {'grouping on':>12} | {'grouping off':>12} | {'on/off':>7} |")
    print(f"|{'-' * 26}|{'-' * 14}|{'-' * 14}|{'-' * 9}|")
    for k in on:
        if k.startswith("_"):
            continue
        ratio = on[k] / off[k] if off[k] else float("nan")
        print(f"| {k:<24} | {on[k]:>12.3f} | {off[k]:>12.3f} | {ratio:>7.2f} |")
    for name, res in (("on", on), ("off", off)):
        for e in res["_errors"]:
            print(f"error (grouping {name}): {e}")
        for k, st in res["_through"]:
            print(f"attack through (grouping {name}): {k} answered {st}")
    if on["errors"] or off["errors"] or on["wrong pool"] or off["wrong pool"] or on["attacks through"] or \
            off["attacks through"] or \
            max(on["peak RSS VmHWM (MiB)"], off["peak RSS VmHWM (MiB)"]) > budget / 2**20:
        sys.exit(1)


if __name__ == "__main__":
    main()
