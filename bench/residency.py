"""Residency of a static bundle: what onnxruntime keeps resident against the bundle's file bytes, and the planner's
budget against the measured peak RSS of `emo-edge run`.

    emo-edge synth /tmp/x/ck4 --preset emo-14b --layers 4 --experts 33
    emo-edge export --model /tmp/x/ck4 --pools all --precision int4 --no-verify --out /tmp/x/b4
    nice -n 10 python bench/residency.py stages /tmp/x/b4 [--options baseline,release,acc1,store] [--repeats 3] \
        [--prompt 256] [--tokens 32] [--threads 2] [--maps]
    nice -n 10 python bench/residency.py fit /tmp/x/b1 /tmp/x/b2 /tmp/x/b4 [--tokens 16] [--threads 2]

`stages`: each option opens the bundle with the static engine (`emo_edge.engine.static.StaticEngine(root, threads)`) in
its own subprocess, prefills `--prompt` tokens into a session (the engine's chunks, its preallocated KV cache) and
greedy-decodes `--tokens`; VmRSS, RssAnon and RssFile
(/proc/self/status) after import, load, prefill and decode, VmHWM, and tokens/s. Options run alternately
(A B A B ...), medians over `--repeats`. `--maps` adds, per stage, the resident bytes of each mapping
(/proc/self/smaps): the bundle's data file split by the tensors it holds, anonymous memory, heap, libraries.
  baseline  cpu_session(..., release=False): the session as onnxruntime leaves it
  release   cpu_session as the loaders call it: external-data pages dropped after load, heap trimmed
  acc1      release, with MatMulNBits/QMoE at accuracy_level 1 (fp32 compute: MLAS packs the 4-bit data alone
            and reads the scales from the mapped file) in a copy of the graph (data hard-linked)
  store     release, on a prepared copy: onnxruntime's prepacked weights saved to external data
            ("session.save_external_prepacked_constant_initializers") and mapped back from disk
  noarena   release, with the CPU memory arena off
  samearena release, sessions on one process-wide arena (session.use_env_allocators) that extends by what is
            requested (kSameAsRequested) instead of doubling (onnxruntime's default arena)
  nopattern release, with onnxruntime's memory-pattern planning off (enable_mem_pattern = False)
  noprepack release, "session.disable_prepacking" (decodes < 1 tok/s at this width: keep --tokens small)
"weights resident" is RSS after load minus RSS after import: what the session holds before any run.

`fit`: runs `python cli.py run BUNDLE --prompt TEXT --max-new-tokens N` with prompts of exactly `--short` and
context - N tokens (the second prefilled in the engine's chunks up to a full context; the first shows the load
peak), polling /proc/PID/status; the peak is the child's ru_maxrss (wait4)
and the anon/file split the one at its highest sampled VmRSS. Planned bytes: the bundle's report.json weights
and KV cache, with the overhead from the current target formula (targets/<target>.json "overhead"). Prints the
least-squares overhead fit (base + fraction x weights) raised to an upper bound of every run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPTIONS = ("baseline", "release", "acc1", "store", "noarena", "samearena", "nopattern", "noprepack")
STATUS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def status(pid: str = "self") -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in STATUS:
                out[k] = int(v.split()[0]) * 1024
    return out


def mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def load_avg() -> str:
    return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cpus"


# ---- per-mapping residency ------------------------------------------------------------------------------
def tensor_table(graph: Path) -> list[tuple[int, int, str, str]]:
    """(offset, length, file, name) of every external initializer of `graph`, by file offset."""
    import onnx

    rows = []
    for t in onnx.load(str(graph), load_external_data=False).graph.initializer:
        d = {e.key: e.value for e in t.external_data}
        if "offset" in d:
            rows.append((int(d["offset"]), int(d["length"]), d["location"], t.name))
    return sorted(rows)


def mappings(data_files: dict[str, str], table) -> dict[str, int]:
    """Resident bytes per group: data-file tensors (by the initializer each mapping overlaps), [anon], [heap],
    [libs], [other files]."""
    out: dict[str, int] = {}
    key = None
    head = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ ([0-9a-f]+) \S+ \d+\s*(.*)$")
    with open("/proc/self/smaps") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        m = head.match(line)
        if m:
            off, path = int(m[1], 16), m[2].strip()
            if path in data_files:
                size = next(int(x.split()[1]) * 1024 for x in lines[i + 1:i + 4] if x.startswith("Size:"))
                loc = data_files[path]
                names = [nm for o, ln, fl, nm in table if fl == loc and o < off + size and o + ln > off]
                key = f"file: {names[0].split('/', 2)[-1] if names else '(prepacked/other)'}"
                key += f" (+{len(names) - 1})" if len(names) > 1 else ""
            elif not path or path.startswith("[anon") or path == "[stack]":
                key = "[anon]"
            elif path == "[heap]":
                key = "[heap]"
            elif ".so" in path:
                key = "[libs]"
            else:
                key = "[other files]"
        elif key and line.startswith("Rss:"):
            out[key] = out.get(key, 0) + int(line.split()[1]) * 1024
    return out


# ---- the stage worker (own process) ---------------------------------------------------------------------
def worker(a) -> dict:
    __import__("onnxruntime")  # counted in the import baseline

    import emo_edge.engine.static as es
    from emo_edge.engine.ort_session import cpu_session

    stages = {"import": status()}
    release = a.option != "baseline"

    def session(graph, opts):
        if a.option == "noarena":
            opts.enable_cpu_mem_arena = False
        if a.option == "nopattern":
            opts.enable_mem_pattern = False
        if a.option == "samearena":  # one process-wide arena growing by what is requested, not by doubling
            import onnxruntime as ort
            if not getattr(session, "registered", False):
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
                session.registered = True
            opts.add_session_config_entry("session.use_env_allocators", "1")
        if a.option == "noprepack":
            opts.add_session_config_entry("session.disable_prepacking", "1")
        return cpu_session(graph, opts, release=release)

    es.cpu_session = session
    graph = Path(a.root) / "model.onnx"
    table = tensor_table(graph) if a.maps else []
    files = {str((graph.parent / loc).resolve()): loc for loc in {r[2] for r in table}}
    maps = {"import": mappings(files, table)} if a.maps else {}
    t = time.perf_counter()
    eng = es.StaticEngine(a.root, threads=a.threads, verify_files=a.option not in ("acc1", "store"))
    load_s = time.perf_counter() - t
    stages["load"] = status()
    if a.maps:
        maps["load"] = mappings(files, table)
    ids = [int(x) for x in np.random.default_rng(0).integers(3, min(eng.vocab_size, 4096), size=a.prompt)]
    sess = eng.session(capacity=a.prompt + a.tokens)
    t = time.perf_counter()
    logits = sess.prefill(ids)
    prefill_s = time.perf_counter() - t
    stages["prefill"] = status()
    if a.maps:
        maps["prefill"] = mappings(files, table)
    nxt, out = int(np.argmax(logits[-1])), []
    t = time.perf_counter()
    for _ in range(a.tokens):
        logits = sess.feed([nxt])
        nxt = int(np.argmax(logits[-1]))
        out.append(nxt)
    decode_s = time.perf_counter() - t
    stages["decode"] = status()
    if a.maps:
        maps["decode"] = mappings(files, table)
    return {"option": a.option, "load_s": load_s, "prefill_tok_s": a.prompt / prefill_s,
            "decode_tok_s": a.tokens / decode_s, "stages": stages, "maps": maps, "tokens": out}


# ---- variants of a bundle (in a scratch directory; the bundle itself is never written) -------------------
def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy(src, dst)


def variant_acc1(root: Path, dest: Path) -> Path:
    import onnx

    dest.mkdir()
    for f in root.iterdir():
        if f.is_file() and f.name != "model.onnx":
            (_link_or_copy if f.suffix == ".data" else shutil.copy)(f, dest / f.name)
    model = onnx.load(str(root / "model.onnx"), load_external_data=False)
    for n in model.graph.node:
        for at in n.attribute:
            if n.op_type in ("MatMulNBits", "QMoE") and at.name == "accuracy_level":
                at.i = 1
    onnx.save(model, str(dest / "model.onnx"))
    return dest


def variant_store(root: Path, dest: Path, threads: int) -> Path:
    import onnxruntime as ort

    dest.mkdir()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.optimized_model_filepath = str(dest / "model.onnx")
    so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(root / "model.onnx"), so, providers=["CPUExecutionProvider"])
    for f in root.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy(f, dest / f.name)
    return dest


def bundle_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.iterdir() if f.is_file())


def data_bytes(root: Path) -> int:
    """Bytes of the graph and its external data (what onnxruntime maps)."""
    return sum(f.stat().st_size for f in root.iterdir() if f.is_file() and f.name.startswith("model.onnx"))


def stages_cmd(a) -> None:
    root = Path(a.bundle).resolve()
    opts = a.options.split(",")
    bad = [o for o in opts if o not in OPTIONS]
    if bad:
        sys.exit(f"error: --options: unknown option '{bad[0]}' (known: {', '.join(OPTIONS)})")
    runs: dict[str, list[dict]] = {o: [] for o in opts}
    with tempfile.TemporaryDirectory(dir=a.tmp, prefix="residency-") as tmp:
        roots = {o: root for o in opts}
        if "acc1" in opts:
            roots["acc1"] = variant_acc1(root, Path(tmp) / "acc1")
        if "store" in opts:
            roots["store"] = variant_store(root, Path(tmp) / "store", a.threads)
        print(f"bundle {root}: {mb(bundle_bytes(root))} MB files, graph + data {mb(data_bytes(root))} MB; prompt "
              f"{a.prompt}, decode {a.tokens}, threads {a.threads}; {load_avg()}", flush=True)
        for rep in range(a.repeats):
            for o in (opts if rep % 2 == 0 else opts[::-1]):
                cmd = [sys.executable, __file__, "_worker", "--option", o, "--root", str(roots[o]),
                       "--prompt", str(a.prompt), "--tokens", str(a.tokens), "--threads", str(a.threads)]
                if a.maps and rep == 0:
                    cmd.append("--maps")
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    sys.exit(f"error: option {o}: {(p.stderr.strip().splitlines() or ['failed'])[-1]}")
                runs[o].append(json.loads(p.stdout.strip().splitlines()[-1]))
        store_bytes = data_bytes(roots["store"]) if "store" in opts else 0
    file_b = data_bytes(root)
    med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
    base_dec = med(runs[opts[0]], lambda r: r["decode_tok_s"])
    print(f"\nMB; RSS anon/file; medians of {a.repeats} (alternating); weights = RSS(load) - RSS(import); "
          f"ratio = weights / graph+data file bytes ({mb(file_b)} MB)")
    print(f"{'option':<10}{'load s':>7}{'import':>13}{'after load':>15}{'weights':>9}{'ratio':>7}"
          f"{'after prefill':>16}{'after decode':>16}{'peak':>8}{'prefill t/s':>12}{'decode t/s':>11}{'vs ' + opts[0]:>13}")
    for o in opts:
        rs = runs[o]
        st = {s: {k: med(rs, lambda r: r["stages"][s][k]) for k in STATUS} for s in rs[0]["stages"]}
        w = st["load"]["VmRSS"] - st["import"]["VmRSS"]
        split = lambda s: f"{mb(st[s]['RssAnon'])}/{mb(st[s]['RssFile'])}"  # noqa: E731
        dec = med(rs, lambda r: r["decode_tok_s"])
        print(f"{o:<10}{med(rs, lambda r: r['load_s']):>7.2f}{split('import'):>13}{split('load'):>15}{mb(w):>9}"
              f"{w / file_b:>7.3f}{split('prefill'):>16}{split('decode'):>16}{mb(st['decode']['VmHWM']):>8}"
              f"{med(rs, lambda r: r['prefill_tok_s']):>12.1f}{dec:>11.2f}{dec / base_dec:>12.2f}x")
    if store_bytes:
        print(f"(store: its graph + data file is {mb(store_bytes)} MB: the originals plus the prepacked copies)")
    agree = all(r["tokens"] == runs[opts[0]][0]["tokens"] for o in opts for r in runs[o] if o != "noprepack")
    print(f"greedy tokens identical across options (noprepack excepted): {agree}; {load_avg()}")
    if a.maps:
        for o in opts:
            m = runs[o][0]["maps"]
            keys = sorted({k for s in m.values() for k in s}, key=lambda k: -max(s.get(k, 0) for s in m.values()))
            print(f"\n{o}: resident MB per mapping   " + "".join(f"{s:>10}" for s in m))
            for k in keys[:a.maps_top]:
                print(f"  {k[:48]:<48}" + "".join(f"{mb(s.get(k, 0)):>10}" for s in m.values()))


# ---- the plan against the peak of `emo-edge run` --------------------------------------------------------
def prompt_text(root: Path, n_tokens: int) -> str:
    """Deterministic text of exactly `n_tokens` tokens under the bundle's tokenizer."""
    from emo_edge.model.tokenizer import TextTokenizer

    tok = TextTokenizer(root / "tokenizer.json")
    rng = np.random.default_rng(0)
    words = [f"{w}{int(x)}" for w, x in zip(rng.choice(["x", "sum", "the", "value", "step"], 8 * n_tokens),
                                             rng.integers(0, 1000, 8 * n_tokens))]
    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose encoding fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(tok.encode(" ".join(words[:mid]))) <= n_tokens else (lo, mid - 1)
    text = " ".join(words[:lo])
    for pad in range(8 * n_tokens):  # top up to the exact count with single characters
        if len(tok.encode(text)) >= n_tokens:
            break
        text += " 1"
    got = len(tok.encode(text))
    if got != n_tokens:
        sys.exit(f"error: could not build a prompt of exactly {n_tokens} tokens for {root} (got {got})")
    return text


def run_peak(cmd: list[str], poll_s: float = 0.002) -> dict:
    """Run `cmd`; its peak RSS (ru_maxrss from wait4) and the RssAnon/RssFile split at its highest sample."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    best = {"VmRSS": 0}
    hwm = 0
    while p.poll() is None:
        try:
            s = status(str(p.pid))
        except (OSError, ValueError):
            break
        hwm = max(hwm, s.get("VmHWM", 0))
        if s.get("VmRSS", 0) > best["VmRSS"]:
            best = s
        time.sleep(poll_s)
    _, rc, ru = os.wait4(p.pid, 0) if p.returncode is None else (p.pid, p.returncode, None)
    out, err = p.communicate()
    peak = max(hwm, ru.ru_maxrss * 1024 if ru else 0)
    return {"rc": rc, "peak": peak, "anon": best.get("RssAnon", 0), "file": best.get("RssFile", 0),
            "stderr": err.strip().splitlines()[-2:]}


def fit_cmd(a) -> None:
    from targets import get_target

    print(f"`python cli.py run BUNDLE --prompt P --max-new-tokens {a.tokens} --threads {a.threads}`, P of "
          f"{a.short} tokens and of context - {a.tokens} tokens; {load_avg()}", flush=True)
    rows = []
    for b in a.bundles:
        root = Path(b).resolve()
        report = json.loads((root / "report.json").read_text())
        plan, cfg = report["plan"]["plan"], json.loads((root / "config.json").read_text())
        over = get_target(plan["target"]).overhead
        w, kv = plan["bytes"]["weights_resident"], plan["bytes"]["kv_cache"]
        per_token = over.bytes(0, cfg["vocab_size"], cfg["hidden_size"]) - over.base_bytes  # the prefill term
        for n in (a.short, plan["context"] - a.tokens):
            cmd = [sys.executable, str(ROOT / "cli.py"), "run", str(root), "--prompt", prompt_text(root, n),
                   "--max-new-tokens", str(a.tokens), "--threads", str(a.threads)]
            r = run_peak(cmd)
            if r["rc"]:
                sys.exit(f"error: {root}: run failed: {' '.join(r['stderr'])}")
            o = over.bytes(w, cfg["vocab_size"], cfg["hidden_size"])
            rows.append(dict(bundle=root.name, layers=cfg["num_hidden_layers"], prompt=n, weights=w, kv=kv,
                             embedding=plan["bytes"]["embedding"],
                             overhead=o, total=w + kv + o, prefill=per_token, **r))
            print(f"{root.name} prompt {n}: peak {mb(r['peak'])} MB; {r['stderr'][-1] if r['stderr'] else ''}",
                  flush=True)
    print("\nMB; plan = weights (resident) + KV cache (context) + overhead (targets' current formula); peak = peak "
          "RSS of the run (anon/file at its highest sample)")
    print(f"{'bundle':<10}{'layers':>7}{'prompt':>7}{'weights':>10}{'KV':>9}{'overhead':>10}{'plan':>10}{'peak':>10}"
          f"{'anon/file':>16}{'peak/plan':>11}")
    for x in rows:
        print(f"{x['bundle']:<10}{x['layers']:>7}{x['prompt']:>7}{mb(x['weights']):>10}{mb(x['kv']):>9}"
              f"{mb(x['overhead']):>10}{mb(x['total']):>10}{mb(x['peak']):>10}"
              f"{mb(x['anon']) + '/' + mb(x['file']):>16}{x['peak'] / x['total']:>11.3f}")
    full = [x for x in rows if x["prompt"] != a.short]
    print(f"plan >= peak on every run: {all(x['peak'] <= x['total'] for x in rows)}; plan within 15 % of the "
          f"context-filling runs: {all(x['peak'] >= 0.85 * x['total'] for x in full)}")
    # what the overhead had to be: peak + the embedding table (charged whole: these prompts touch few of its rows,
    # a real vocabulary's text can touch them all) - weights - KV cache - the prefill term (kept as it is); fitted
    # on the context-filling runs, then raised to bound every run
    need = lambda x: x["peak"] + x["embedding"] - x["weights"] - x["kv"] - x["prefill"]  # noqa: E731
    ws = np.array([x["weights"] for x in full], float)
    if len(set(ws)) >= 2:
        frac, base = np.polyfit(ws, np.array([need(x) for x in full], float), 1)
        base += max(0.0, max(need(x) - (base + frac * x["weights"]) for x in rows))
        plan_of = lambda x: x["weights"] + x["kv"] + x["prefill"] + base + frac * x["weights"]  # noqa: E731
        ratios = ", ".join(f"{(x['peak'] + x['embedding']) / plan_of(x):.3f}" for x in rows)
        print(f"fit: overhead = {base:.0f} B + {frac:.4f} x weights + the prefill term; with it, (peak + embedding)"
              f" / plan = {ratios}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(load_avg())


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_worker":
        p = argparse.ArgumentParser()
        p.add_argument("--option", required=True); p.add_argument("--root", required=True)
        p.add_argument("--prompt", type=int, default=256); p.add_argument("--tokens", type=int, default=32)
        p.add_argument("--threads", type=int, default=2); p.add_argument("--maps", action="store_true")
        print(json.dumps(worker(p.parse_args(argv[1:]))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stages", help="resident bytes per stage and option")
    s.add_argument("bundle")
    s.add_argument("--options", default="baseline,release")
    s.add_argument("--prompt", type=int, default=256)
    s.add_argument("--tokens", type=int, default=32)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--maps", action="store_true", help="per-mapping residency (first repeat)")
    s.add_argument("--maps-top", type=int, default=12)
    s.add_argument("--tmp", default=None, help="scratch directory for the acc1/store variants")
    f = sub.add_parser("fit", help="planned bytes vs peak RSS of `emo-edge run` filling the context")
    f.add_argument("bundles", nargs="+")
    f.add_argument("--tokens", type=int, default=16)
    f.add_argument("--json", help="write the runs here")
    f.add_argument("--short", type=int, default=16, help="tokens of the short prompt (the load-peak regime)")
    f.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    (stages_cmd if a.cmd == "stages" else fit_cmd)(a)


if __name__ == "__main__":
    main()
