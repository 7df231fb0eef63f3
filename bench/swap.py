"""Pool-swapping benchmark: a scripted session alternating pools with generation between swaps, on a swappable
bundle, under a memory budget that fits one pool but not two.

    nice -n 10 python bench/swap.py BUNDLE [--budget auto|2GB] [--sequence math,code,prose,math,chat,code]
                                           [--mechanism auto|mapped|rebuild] [--compare]
                                           [--static STATIC_BUNDLE_DIR] [--warm]

Per swap: latency, bytes read, the disk-read floor (bytes read / measured cold sequential read bandwidth of the
files the mechanism reads, the faster of preadv and MADV_POPULATE_READ; page cache dropped with posix_fadvise
before the measurement and before every swap unless --warm),
experts read / reused from the previous pool / taken from the LRU cache, decode tokens/s of the generation that
follows, RSS. Summary: swap latency min/median/max, ratio to the floor, reuse rate, peak RSS (VmHWM and a 2 ms
sampler) against the budget. With --static, the "new InferenceSession per pool" alternative is timed on that
static bundle in a subprocess (its load time and RSS), for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emo_edge.engine.memory import peak_rss, reset_peak_rss, rss  # noqa: E402
from emo_edge.engine.swappable import SwappableEngine  # noqa: E402
from emo_edge.units import parse_size  # noqa: E402

MiB = 1 << 20


def drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bandwidth(paths, nbytes: int = 256 * MiB, chunk: int = 4 * MiB) -> dict:
    """Cold sequential read bandwidth (bytes/s) of the files the runtime reads, two ways: preadv into anonymous
    memory (4 MiB chunks) and MADV_POPULATE_READ of a private file mapping (what the mapped mechanism does);
    page cache dropped before each; the median of three runs each. The floor uses the faster of the two."""
    return {"preadv": float(np.median([_bw_preadv(paths, nbytes, chunk) for _ in range(3)])),
            "populate": float(np.median([_bw_populate(paths, nbytes) for _ in range(3)]))}


def _bw_populate(paths, nbytes: int) -> float:
    import mmap

    from emo_edge.engine.swappable.mapped import MADV_POPULATE_READ, madvise
    drop_cache(paths)
    done, t0 = 0, time.perf_counter()
    for p in paths:
        size = min(os.path.getsize(p), nbytes - done) // 4096 * 4096
        if size <= 0:
            break
        with open(p, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
            view = np.frombuffer(mm, np.uint8)
            addr = view.ctypes.data
            ok = all(not madvise(addr + a, min(4 * MiB, size - a), MADV_POPULATE_READ) for a in range(0, size, 4 * MiB))
            del view
            mm.close()
            if not ok:
                return float("nan")
        done += size
        if done >= nbytes:
            break
    dt = time.perf_counter() - t0
    drop_cache(paths)
    return done / dt


def _bw_preadv(paths, nbytes: int, chunk: int) -> float:
    drop_cache(paths)
    buf = np.empty(chunk, np.uint8)
    done, t0 = 0, time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            off = 0
            while done < nbytes:
                got = os.preadv(fd, [buf.data], off)
                if got <= 0:
                    break
                done += got
                off += got
        finally:
            os.close(fd)
        if done >= nbytes:
            break
    dt = time.perf_counter() - t0
    drop_cache(paths)
    return done / dt


class Sampler(threading.Thread):
    def __init__(self, period=0.002):
        super().__init__(daemon=True)
        self.period, self.peak, self.stop_flag = period, 0, False

    def run(self):
        while not self.stop_flag:
            self.peak = max(self.peak, rss())
            time.sleep(self.period)


def static_alternative(static_dir: str, threads: int | None) -> dict:
    code = f"""
import json, time, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from emo_edge.engine.memory import rss, peak_rss
import onnxruntime as ort
so = ort.SessionOptions(); so.log_severity_level = 3
{'so.intra_op_num_threads = %d' % threads if threads else ''}
t = time.perf_counter()
s = ort.InferenceSession({str(Path(static_dir) / 'model.onnx')!r}, so, providers=['CPUExecutionProvider'])
dt = time.perf_counter() - t
from emo_edge.engine import StaticEngine
b = StaticEngine({str(static_dir)!r}, threads={threads!r})
tm = b.generate(list(range(100, 116)), max_tokens=8, ignore_eos=True)
print(json.dumps({{"load_s": dt, "rss": rss(), "peak_rss": peak_rss(), "decode_tok_s": tm.decode_tok_s}}))
"""
    files = [Path(static_dir) / "model.onnx.data"]
    drop_cache(files)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr else "failed"}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["bytes"] = sum(p.stat().st_size for p in files)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--budget", default="auto", help="auto: what one pool needs (+4%%), checked below two pools")
    ap.add_argument("--sequence", default="math,code,prose,math,chat,code,prose,math")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mechanism", default="auto", choices=["auto", "mapped", "rebuild"])
    ap.add_argument("--warm", action="store_true", help="do not drop the shards from the page cache before swaps")
    ap.add_argument("--static", default=None, help="static bundle of one pool: time the session-rebuild alternative")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--compare", action="store_true",
                    help="run the session once per mechanism (mapped, rebuild), each in its own process and under "
                         "its own 'fits one pool, not two' budget, and print them side by side")
    a = ap.parse_args(argv)
    if a.compare:
        return compare(a, argv if argv is not None else sys.argv[1:])

    t_open = time.perf_counter()
    rt = SwappableEngine(a.bundle, budget=None, threads=a.threads, max_tokens=a.prompt_tokens + a.new_tokens + 8,
                          mechanism=a.mechanism, progress=lambda msg: print("  " + msg, flush=True))
    t_open = time.perf_counter() - t_open
    # the files a swap reads: the per-machine prepared store (mapped mechanism) or the bundle's shards (rebuild)
    shards = ([L.mapped.data_path for L in rt.layers] if rt.mechanism == "mapped"
              else [rt.root / m["shard"] for m in rt.sw["moe"]])
    seq = [s.strip() for s in a.sequence.split(",") if s.strip()]
    one = rt.required_bytes()
    pool_raw = one["pool_raw"]
    # two pools resident (no transient at all): what a budget "that fits one pool but not two" must stay below
    two = one["backbone_rss"] + one["kv_cache"] + one["activations"] + 2 * (one["pool_raw"] + one["pool_prepacked"])
    # auto: what one pool needs (+3 %), and at least what opening took (the budget holds from the start)
    budget = (max(int(one["total"] * 1.03), int(rt.startup_peak * 1.01)) if a.budget == "auto"
              else parse_size(a.budget, "--budget"))
    rt.budget = budget
    rt._check_budget_fits()
    bws = disk_bandwidth(shards)
    bw = max(v for v in bws.values() if v == v)
    print(f"bundle {a.bundle}: backbone RSS {rt.backbone_rss / MiB:.0f} MiB; largest pool {pool_raw / MiB:.0f} MiB raw; "
          f"one pool needs {one['total'] / MiB:.0f} MiB, two {two / MiB:.0f} MiB; budget {budget / MiB:.0f} MiB "
          f"({'fits one pool, not two' if one['total'] <= budget < two else 'CHECK'}); cold disk read "
          f"{bw / 1e6:.0f} MB/s (preadv {bws['preadv'] / 1e6:.0f}, populate {bws['populate'] / 1e6:.0f}); mechanism "
          f"{rt.mechanism}; opening took {t_open:.1f} s, peak RSS while opening {rt.startup_peak / MiB:.0f} MiB",
          flush=True)

    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(3, min(rt.vocab_size, 4000), a.prompt_tokens)]
    reset_peak_rss()
    sampler = Sampler()
    sampler.start()
    rows = []
    for name in seq:
        if not a.warm:
            drop_cache(shards)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        st = rt.use(name)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        pool_size = sum(len(x) for x in rt.active)
        res = rt.generate(prompt, pool=name, max_tokens=a.new_tokens, ignore_eos=True)
        floor = st.bytes_read / bw
        rows.append({"pool": name, "swap_ms": st.seconds * 1e3, "read_ms": st.read_s * 1e3,
                     "build_ms": st.build_s * 1e3, "MiB_read": st.bytes_read / MiB, "floor_ms": floor * 1e3,
                     "x_floor": st.seconds / floor if floor else float("nan"), "read": st.experts_read,
                     "reused": st.experts_reused, "cached": st.experts_from_cache, "pool_experts": pool_size,
                     "decode_tok_s": res.decode_tok_s, "rss_MiB": rss() / MiB, "layers": st.layers_rebuilt,
                     "cpu_ms": cpu * 1e3})
        r = rows[-1]
        print(f"  {name:6s} swap {r['swap_ms']:7.0f} ms (reader done {r['read_ms']:6.0f}, builds {r['build_ms']:6.0f}) "
              f"read {r['MiB_read']:6.0f} MiB ({r['read']:3d} experts, reused {r['reused']:3d}, cache "
              f"{r['cached']:3d}) floor {r['floor_ms']:6.0f} ms x{r['x_floor']:.2f}  decode "
              f"{r['decode_tok_s']:5.1f} tok/s  RSS {r['rss_MiB']:.0f} MiB", flush=True)
    sampler.stop_flag = True
    sampler.join()
    hwm = peak_rss()
    # the disk drifts on a shared machine: measure it again after the session and take the floor from all six
    bws_after = disk_bandwidth(shards)
    bw_all = [v for v in (*bws.values(), *bws_after.values()) if v == v]
    bw_before = bw
    bw = float(np.median([max(bws["preadv"], bws["populate"]), max(bws_after["preadv"], bws_after["populate"])]))
    for r in rows:
        r["floor_ms"] = r["MiB_read"] * MiB / bw * 1e3
        r["x_floor"] = r["swap_ms"] / r["floor_ms"] if r["floor_ms"] else float("nan")
    print(f"cold disk read after the session: preadv {bws_after['preadv'] / 1e6:.0f}, populate "
          f"{bws_after['populate'] / 1e6:.0f} MB/s; floor bandwidth = mean of the faster method before and after: "
          f"{bw / 1e6:.0f} MB/s (range of all measurements {min(bw_all) / 1e6:.0f}-{max(bw_all) / 1e6:.0f})")
    swaps = [r for r in rows[1:]]  # the first load is not a swap
    lat = np.array([r["swap_ms"] for r in swaps]) if swaps else np.array([np.nan])
    ratio = np.array([r["x_floor"] for r in swaps if r["MiB_read"] > 0]) if swaps else np.array([np.nan])
    reuse = np.mean([(r["reused"] + r["cached"]) / r["pool_experts"] for r in swaps]) if swaps else float("nan")
    summary = {
        "budget_MiB": budget / MiB, "one_pool_needs_MiB": one["total"] / MiB, "two_pools_need_MiB": two / MiB,
        "disk_MBps": bw / 1e6, "disk_MBps_before": bw_before / 1e6,
        "disk_MBps_after": max(bws_after["preadv"], bws_after["populate"]) / 1e6, "disk_MBps_preadv": bws["preadv"] / 1e6, "disk_MBps_populate": bws["populate"] / 1e6,
        "mechanism": rt.mechanism, "open_s": t_open, "open_peak_rss_MiB": rt.startup_peak / MiB, "swap_ms_min": float(lat.min()), "swap_ms_median": float(np.median(lat)),
        "swap_ms_max": float(lat.max()), "x_floor_median": float(np.median(ratio)) if ratio.size else None,
        "x_floor_max": float(ratio.max()) if ratio.size else None,
        "MiB_read_per_swap": float(np.mean([r["MiB_read"] for r in swaps])) if swaps else 0.0,
        "reuse_rate": float(reuse), "cpu_ms_median": float(np.median([r["cpu_ms"] for r in swaps])) if swaps else 0.0,
        "cores": os.cpu_count(), "decode_tok_s_median": float(np.median([r["decode_tok_s"] for r in rows])),
        "peak_rss_MiB_hwm": hwm / MiB, "peak_rss_MiB_sampled": sampler.peak / MiB,
        "under_budget": bool(hwm <= budget and sampler.peak <= budget), "prepack_factor": rt.prepack_factor}
    rt.close()
    alt = static_alternative(a.static, a.threads) if a.static else None

    print()
    print("| metric | value |")
    print("|---|---|")
    print(f"| budget / one pool needs / two pools need | {summary['budget_MiB']:.0f} / {summary['one_pool_needs_MiB']:.0f}"
          f" / {summary['two_pools_need_MiB']:.0f} MiB |")
    print(f"| swaps (after the first load) | {len(swaps)} |")
    print(f"| swap latency min / median / max | {summary['swap_ms_min']:.0f} / {summary['swap_ms_median']:.0f} / "
          f"{summary['swap_ms_max']:.0f} ms |")
    print(f"| bytes read per swap (mean) | {summary['MiB_read_per_swap']:.0f} MiB |")
    print(f"| disk read floor: cold bandwidth (before / after the session) | {summary['disk_MBps']:.0f} MB/s "
          f"({summary['disk_MBps_before']:.0f} / {summary['disk_MBps_after']:.0f}) |")
    print(f"| swap latency / floor, median / max | {summary['x_floor_median']:.2f} / {summary['x_floor_max']:.2f} |")
    print(f"| CPU time per swap (user+sys, median) on {summary['cores']} cores | {summary['cpu_ms_median']:.0f} ms |")
    print(f"| expert reuse rate between pools | {summary['reuse_rate']:.2f} |")
    print(f"| decode tokens/s (median) | {summary['decode_tok_s_median']:.1f} |")
    print(f"| peak RSS (VmHWM / 2 ms sampler) vs budget | {summary['peak_rss_MiB_hwm']:.0f} / "
          f"{summary['peak_rss_MiB_sampled']:.0f} MiB vs {summary['budget_MiB']:.0f} MiB: "
          f"{'UNDER' if summary['under_budget'] else 'OVER'} |")
    if alt:
        if "error" in alt:
            print(f"| session rebuild (static bundle) | failed: {alt['error']} |")
        else:
            print(f"| alternative: new InferenceSession per pool | {alt['load_s'] * 1e3:.0f} ms to load "
                  f"{alt['bytes'] / MiB:.0f} MiB (whole model), RSS {alt['rss'] / MiB:.0f} MiB; static decode "
                  f"{alt['decode_tok_s']:.1f} tok/s |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "summary": summary, "static_alternative": alt}, indent=1))
    return 0 if summary["under_budget"] else 1


def compare(a, argv) -> int:
    import tempfile

    passthrough = [x for x in argv if x not in ("--compare",)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mech in ("mapped", "rebuild"):
            out = Path(tmp) / f"{mech}.json"
            print(f"== mechanism {mech}", flush=True)
            args = [sys.executable, __file__, *_drop_opt(passthrough, "--mechanism"), "--mechanism", mech]
            r = subprocess.run(_drop_opt(args, "--json") + ["--json", str(out)])
            if r.returncode not in (0, 1) or not out.exists():
                print(f"mechanism {mech} failed (exit {r.returncode})")
                return 2
            results[mech] = json.loads(out.read_text())["summary"]
    m, r = results["mapped"], results["rebuild"]
    rows = [("budget (fits one pool, not two)", "budget_MiB", "{:.0f} MiB"),
            ("opening: time", "open_s", "{:.1f} s"), ("opening: peak RSS", "open_peak_rss_MiB", "{:.0f} MiB"),
            ("swap latency median", "swap_ms_median", "{:.0f} ms"), ("swap latency max", "swap_ms_max", "{:.0f} ms"),
            ("bytes read per swap", "MiB_read_per_swap", "{:.0f} MiB"),
            ("disk floor bandwidth", "disk_MBps", "{:.0f} MB/s"),
            ("swap / floor, median", "x_floor_median", "{:.2f}"), ("swap / floor, max", "x_floor_max", "{:.2f}"),
            ("CPU per swap (user+sys) median", "cpu_ms_median", "{:.0f} ms"),
            ("decode tok/s median", "decode_tok_s_median", "{:.1f}"),
            ("peak RSS (VmHWM)", "peak_rss_MiB_hwm", "{:.0f} MiB")]
    print()
    print("| metric | mapped | rebuild | rebuild / mapped |")
    print("|---|---|---|---|")
    for label, key, fmt in rows:
        ratio = r[key] / m[key] if m.get(key) else float("nan")
        print(f"| {label} | {fmt.format(m[key])} | {fmt.format(r[key])} | {ratio:.2f} |")
    print(f"| under budget | {m['under_budget']} | {r['under_budget']} | |")
    return 0 if m["under_budget"] and r["under_budget"] else 1


def _drop_opt(args, opt):
    out, skip = [], False
    for x in args:
        if skip:
            skip = False
            continue
        if x == opt:
            skip = True
            continue
        if x.startswith(opt + "="):
            continue
        out.append(x)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
