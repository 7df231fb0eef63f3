"""The processes of the side-by-side benchmarks (bench/peers.py, peers_check.py, variants.py, op_profile.py):
each run is a fresh worker process that prints one JSON line. `emo`: this Python, the bundle through emo-edge's
engine (`open_engine`, as `emo-edge run`); `llama` / `llama_logits`: the llama-cpp-python venv's Python,
llama.cpp's C API. Also the scheduler and memory counters each worker reports (see bench/peers.py).

    python bench/peer_workers.py _worker KIND < JOB.json      (what `run_worker` starts)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LLAMA_PYTHON = "/tmp/llama/venv/bin/python"


def token_range(ckpt: Path) -> tuple[int, int]:
    """Prompt ids are drawn from the tokenizer's non-special ids (the synthetic emo-14b has 2795 BPE tokens;
    its embedding pads to 100352 rows)."""
    from emo_edge.errors import CheckpointError
    from emo_edge.schema import load_json

    tok = load_json(ckpt / "tokenizer.json", CheckpointError, "not found (prompt ids come from its vocabulary)")
    special = {a["id"] for a in tok.get("added_tokens", [])}
    n = len(tok["model"]["vocab"])
    return max(special, default=-1) + 1, n


def sched() -> tuple[float, float, int]:
    """(cpu s, runqueue-wait s) summed over this process's threads, and its involuntary context switches."""
    import resource

    cpu = wait = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:  # a thread that just ended
            continue
        cpu, wait = cpu + int(fields[0]), wait + int(fields[1])
    return cpu / 1e9, wait / 1e9, resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def contention(before: tuple, wall_s: float) -> dict:
    cpu, wait, nivcsw = (b - a for a, b in zip(before, sched()))
    return {"decode_cpu": cpu / wall_s, "decode_wait": wait / wall_s, "decode_nivcsw": nivcsw}


def memory() -> dict:
    """Peak RSS (VmHWM: ru_maxrss would carry a big parent's peak across exec), RssAnon and RssFile, bytes."""
    with open("/proc/self/status") as f:
        got = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
               if k in ("VmHWM", "RssAnon", "RssFile")}
    return {"peak_rss": got["VmHWM"], "rssanon": got["RssAnon"], "rssfile": got["RssFile"]}


# ---- workers: each runs in its own process and prints one JSON line -----------------------------------------
def worker_emo(job: dict) -> dict:
    """emo-edge's side through its engine (what `emo-edge run` uses): greedy, past EOS, one decode session."""
    from emo_edge.engine import Sampling, open_engine

    t0 = time.perf_counter()
    eng = open_engine(job["bundle"], threads=job["threads"])
    load_s = time.perf_counter() - t0
    eng.generate(job["ids"][:1], sampling=Sampling(2, ignore_eos=True))  # warm-up
    mark: list = []  # scheduler counters when the first token (from the prefill's logits) is out

    def first(_tok: int) -> None:
        if not mark:
            mark.append(sched())

    t = eng.generate(job["ids"], sampling=Sampling(job["tokens"], ignore_eos=True), on_token=first)
    return {"side": "emo", "load_s": load_s, "prefill_s": t.prefill_s, "decode_s": t.decode_s,
            "prefill_tok_s": len(job["ids"]) / t.prefill_s, "decode_tok_s": t.decode_tokens / t.decode_s,
            **contention(mark[0], t.decode_s), **memory(),
            "tokens": [int(x) for x in t.ids]}


class Llama:
    """A llama.cpp model and context through llama-cpp-python's C API (no high-level wrapper in the timing)."""

    def __init__(self, path: str, n_ctx: int, threads: int, mmap: bool = True):
        import ctypes

        import llama_cpp as L

        self.L = L
        self._quiet = L.llama_log_callback(lambda level, text, user: None)  # kept alive: C holds the pointer
        L.llama_log_set(self._quiet, ctypes.c_void_p())
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_mmap = mmap
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"{path}: llama.cpp cannot load it")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_threads, cp.n_threads_batch = n_ctx, threads, threads
        self.n_batch = cp.n_batch
        self.params = {"mmap": mmap, "n_ctx": cp.n_ctx, "n_batch": cp.n_batch, "n_ubatch": cp.n_ubatch,
                       "flash_attn_type": cp.flash_attn_type, "type_k": cp.type_k, "type_v": cp.type_v}
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.system_info = " ".join(f.split(" = ")[0].strip() for f in L.llama_print_system_info().decode()
                                    .replace("CPU :", "").split("|") if f.strip().endswith("= 1"))
        self.version = L.__version__

    def forward(self, ids: list[int], start: int, all_logits: bool = False) -> np.ndarray:
        """Decode `ids` at positions start.. ; the logits of the last token (or of every token), float32."""
        rows = []
        for a in range(0, len(ids), self.n_batch):
            chunk = ids[a:a + self.n_batch]
            b = self.batch
            for i, tok in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, start + a + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits or (a + i == len(ids) - 1)
            b.n_tokens = len(chunk)
            rc = self.L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for i in (range(len(chunk)) if all_logits else [-1] if a + len(chunk) == len(ids) else []):
                ptr = self.L.llama_get_logits_ith(self.ctx, i)
                rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return np.stack(rows)

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)


def worker_llama(job: dict) -> dict:
    t0 = time.perf_counter()
    m = Llama(job["gguf"], job["n_ctx"], job["threads"], job["llama_mmap"])
    load_s = time.perf_counter() - t0
    m.forward(job["ids"][:1], 0)  # warm-up, as llama-cli does, then an empty cache
    m.clear()
    ids = job["ids"]
    t = time.perf_counter()
    nxt = int(np.argmax(m.forward(ids, 0)[-1]))
    prefill_s = time.perf_counter() - t
    out, pos = [nxt], len(ids)
    before = sched()
    t = time.perf_counter()
    for _ in range(job["tokens"] - 1):
        nxt = int(np.argmax(m.forward([nxt], pos)[-1]))
        out.append(nxt)
        pos += 1
    decode_s = time.perf_counter() - t
    return {"side": "llama", "load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": (job["tokens"] - 1) / decode_s,
            **contention(before, decode_s), **memory(), "tokens": out,
            "params": m.params, "system_info": m.system_info, "version": m.version}


def worker_llama_logits(job: dict) -> dict:
    m = Llama(job["gguf"], job["n_ctx"], job["threads"], job.get("llama_mmap", True))
    logits = m.forward(job["ids"], 0, all_logits=True)
    np.save(job["out"], logits.astype(np.float32))
    return {"side": "llama_logits", "shape": list(logits.shape)}


WORKERS = {"emo": worker_emo, "llama": worker_llama, "llama_logits": worker_llama_logits}


def run_worker(kind: str, job: dict, llama_python: str) -> dict:
    """One fresh process; the job travels on stdin, the result comes back as the last stdout line."""
    python = llama_python if kind.startswith("llama") else sys.executable
    proc = subprocess.run([python, str(Path(__file__).resolve()), "_worker", kind], input=json.dumps(job),
                          capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        return {"side": kind, "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_or_work(ap, worker, argv=None):
    """The side-by-side scripts' shared tail of argument parsing: --threads, --json, and the hidden --worker
    JOB, which runs `worker(JOB)` in this process, prints its JSON line and exits; else the parsed args."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        sys.exit(0)
    return a


def worker_main(kind: str) -> None:
    sys.path.insert(0, str(ROOT))
    print(json.dumps(WORKERS[kind](json.loads(sys.stdin.read()))))


if __name__ == "__main__":
    if sys.argv[1:2] != ["_worker"] or len(sys.argv) != 3 or sys.argv[2] not in WORKERS:
        sys.exit(f"usage: {sys.argv[0]} _worker {{{','.join(WORKERS)}}} < JOB.json")
    worker_main(sys.argv[2])
