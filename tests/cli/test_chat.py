"""`emo-edge chat` is a conversation (issue 10, item 15), tested through a subprocess with piped stdin on a
swappable bundle of the embedded model: the chat format and kept history (the second answer equals an
independent greedy loop over the rendered two-turn conversation), oldest turns dropped with a notice, the "> "
prompt, backslash-continued input, /help equal to the list in `chat --help`, impossible --max-new-tokens refused
at start-up, and Ctrl-C (SIGINT) during an answer cancelling it while the session goes on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from emo_edge.commands.chat import COMMANDS, help_text
from emo_edge.engine.swappable import SwappableEngine
from emo_edge.model.tokenizer import CHAT, EOS

ROOT = Path(__file__).resolve().parents[2]
CTX = 1024  # the bundle's context; most tests run with --max-tokens LIMIT (the runtime's KV reserve)
LIMIT = "128"


def chat(bundle: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "chat", str(bundle), "--max-tokens", LIMIT, *args],
                          input=stdin, capture_output=True, text=True, cwd=str(ROOT), timeout=300)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "swap"
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "export", "--pools", "math,code,prose,chat",
                        "--swappable", "--precision", "int4", "--context", str(CTX), "--no-verify", "--out", str(out)],
                       capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    return out


def greedy_reply(rt: SwappableEngine, text: str, pool: str, n: int) -> str:
    """Independent: full forward per step under `pool`, until EOS, a stop string or n tokens."""
    ids = rt.tokenizer.encode(text)
    seq = list(ids)
    for _ in range(n):
        nxt = int(np.argmax(rt.logits(seq, pool=pool)[-1]))
        if nxt == rt.eos:
            break
        seq.append(nxt)
        reply = rt.tokenizer.decode(seq[len(ids):])
        if any(s in reply for s in CHAT.stop):
            break
    reply = rt.tokenizer.decode(seq[len(ids):])
    cut = min([reply.find(s) for s in CHAT.stop if s in reply] or [len(reply)])
    return reply[:cut].strip()


def test_conversation_keeps_history_in_the_chat_format(bundle):
    m1, m2 = "How long should I boil an egg?", "Why is that?"
    r = chat(bundle, "--pool", "chat", "--max-new-tokens", "24", stdin=f"{m1}\n{m2}\n")
    assert r.returncode == 0, r.stderr
    assert EOS not in r.stdout and "Traceback" not in r.stderr
    answers = r.stdout.split("> ")
    assert answers[0] == "" and len(answers) == 4 and answers[-1] == ""  # a prompt before each read
    rt = SwappableEngine(bundle)
    a1 = greedy_reply(rt, CHAT.render([(m1, None)]), "chat", 24)
    a2 = greedy_reply(rt, CHAT.render([(m1, a1), (m2, None)]), "chat", 24)
    assert answers[1].strip() == a1 and answers[2].strip() == a2
    # the second answer was generated after the whole conversation, in the chat format
    second = rt.tokenizer.encode(CHAT.render([(m1, a1), (m2, None)]))
    assert f"prompt {len(second)} tokens (2 turn(s) in context)" in r.stderr.splitlines()[-1]
    assert CHAT.render([(m1, a1), (m2, None)]) == f"User: {m1}\nAssistant: {a1}\nUser: {m2}\nAssistant:"
    rt.close()


def test_oldest_turns_dropped_with_notice(bundle):
    msgs = ["How do I keep rice from getting sticky?", "What should I pack for a week in the mountains?",
            "Is it better to take the train or the bus?", "How can I focus better in the morning?"]
    r = chat(bundle, "--pool", "chat", "--max-new-tokens", "40", stdin="\n".join(msgs) + "\n")
    assert r.returncode == 0, r.stderr
    assert "oldest turn(s) to fit 128 tokens]" in r.stderr
    assert r.stderr.count("[pool chat") == len(msgs)  # every message answered


def test_multiline_input_help_and_commands(bundle):
    r = chat(bundle, "--pool", "math", "--max-new-tokens", "4",
             stdin="Solve for x: \\\n3x + 5 = 20.\n/help\n/bogus\n/reset\n/quit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("[pool math") == 1  # the two lines were one message; nothing after /quit
    read = re.search(r"read (\d+) experts \((\d+(?:\.\d+)?) (B|KB|MB|GB)\)", r.stderr)  # real units, never "0 MiB"
    assert read and int(read[1]) > 0 and float(read[2]) > 0, r.stderr
    assert ". " in r.stdout  # the continuation prompt
    assert help_text() in r.stderr and "unknown command '/bogus'" in r.stderr and "[conversation cleared]" in r.stderr
    h = subprocess.run([sys.executable, str(ROOT / "cli.py"), "chat", "--help"], capture_output=True, text=True,
                       cwd=str(ROOT))
    for cmd, what in COMMANDS:
        assert any(cmd in ln and what in ln for ln in h.stdout.splitlines()), cmd


def test_impossible_max_new_tokens_refused_at_startup(bundle):
    r = chat(bundle, "--max-new-tokens", LIMIT, stdin="hello\n")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("error: --max-new-tokens 128: must be below the context")
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "chat", str(bundle), "--max-tokens", "4096",
                        "--max-new-tokens", str(CTX)], input="hello\n", capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 2 and f"must be below the context ({CTX} tokens)" in r.stderr
    r = chat(bundle, "--prompt", "word " * 200, "--max-new-tokens", "8")
    assert r.returncode == 2 and "does not fit the context (128 tokens)" in r.stderr


def test_ctrl_c_cancels_the_answer_not_the_session(bundle, tmp_path):
    env = dict(os.environ, EMO_EDGE_HOME=os.environ.get("EMO_EDGE_HOME", str(tmp_path)))
    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "chat", str(bundle), "--pool", "code",
                          "--max-new-tokens", "900", "--max-tokens", str(CTX)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT), env=env, bufsize=0)
    p.stdin.write(b"def parse_records(lines):\n")
    p.stdin.flush()
    seen = b""
    deadline = time.time() + 120
    while len(seen) < 3 and time.time() < deadline:  # "> " then the first streamed byte of the answer
        seen += p.stdout.read(1)
    p.send_signal(signal.SIGINT)
    p.stdin.write(b"/quit\n")
    p.stdin.flush()
    out, err = p.communicate(timeout=120)
    err = err.decode()
    assert p.returncode == 0, err
    assert "[cancelled]" in err and "Traceback" not in err
    decoded = int(err.split("decode ")[1].split(" tokens")[0])
    assert decoded < 899  # stopped early, not the whole answer
    assert (seen + out).decode().rstrip().endswith(">")  # the next prompt was printed and read /quit
