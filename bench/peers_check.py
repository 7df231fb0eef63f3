"""Is the GGUF the same model? Each side's logits at every position of one prompt against emo-edge's fp32
reference (`emo-edge logits CKPT`, the PyTorch model every bundle is verified against).

    /tmp/llama/venv/bin/python bench/gguf_emo.py write /tmp/peers/ckpt /tmp/peers/emo-bf16.gguf   # 8 GB, 25 s
    nice -n 10 python bench/peers_check.py --model /tmp/peers/ckpt --bundle /tmp/peers/bundle \
        --gguf /tmp/peers/emo-q4_0.gguf,/tmp/peers/emo-bf16.gguf [--length 16]

Per side: Pearson correlation of the logits with the reference's (min and mean over positions), how many
positions have the same argmax, and the relative RMS error. The bf16 GGUF holds the checkpoint's own weights:
near-1 correlation and agreement there say the architecture, the routing and the RoPE row layout are right;
the Q4_0 and int4 rows then show what each quantizer costs. llama.cpp runs in the llama venv's Python
(bench/peers.py's `llama_logits` worker); synthetic weights give near-flat logits, so a few argmax ties differ.

`--replay RUN.json` (a peers.py --json report, run with the same --seed) checks instead that each side's greedy
tokens are real: the prompt plus the first run's tokens go through each side again in one teacher-forced pass,
and the argmax at each position must be the token that run generated next (a one-pass forward and the
incremental decode differ only in rounding, which can flip a near-tie of the flat synthetic logits).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

from peer_workers import LLAMA_PYTHON, run_worker, token_range  # noqa: E402 (bench/ is on the path)


def check(args) -> None:
    """Each side's logits at every position of one prompt vs the fp32 reference (`emo-edge logits CKPT`)."""
    rng = np.random.default_rng(args.seed + 1)
    ids = [int(x) for x in rng.integers(*token_range(args.model), size=args.length)]
    csv = ",".join(map(str, ids))
    with tempfile.TemporaryDirectory(prefix="peers-check-", dir=args.tmp) as tmp:
        got = {}
        for name, model in (("reference fp32", args.model), ("emo-edge bundle", args.bundle)):
            out = Path(tmp) / f"{len(got)}.npy"
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "-q", "logits", str(model), "--ids", csv,
                                   "--out", str(out)], capture_output=True, text=True, cwd=str(ROOT))
            if proc.returncode != 0:
                raise SystemExit(f"error: logits of {model}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
            got[name] = (np.load(out), time.perf_counter() - t)
        for gguf in args.gguf.split(","):
            out = Path(tmp) / f"{len(got)}.npy"
            t = time.perf_counter()
            r = run_worker("llama_logits", {"gguf": gguf, "ids": ids, "n_ctx": 256, "threads": args.threads,
                                            "out": str(out)}, args.llama_python)
            if "error" in r:
                raise SystemExit(f"error: llama.cpp logits of {gguf}: {r['error']}")
            got[f"llama.cpp {Path(gguf).name}"] = (np.load(out), time.perf_counter() - t)
    ref = got.pop("reference fp32")[0].astype(np.float64)
    print(f"logits at all {len(ids)} positions of one prompt vs the fp32 reference ({args.model}); uptime load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'side':<34}{'corr (min/mean)':>18}{'argmax agree':>14}{'rel RMS err':>13}{'ref std':>9}{'s':>7}")
    for name, (lg, secs) in got.items():
        lg = lg.astype(np.float64)[:, :ref.shape[1]]
        corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(lg, ref)]
        agree = int(sum(int(np.argmax(a) == np.argmax(b)) for a, b in zip(lg, ref)))
        rel = float(np.sqrt(((lg - ref) ** 2).mean() / (ref ** 2).mean()))
        print(f"{name:<34}{min(corr):>9.4f}/{np.mean(corr):.4f}{agree:>9}/{len(ids):<4}{rel:>13.4f}"
              f"{ref.std():>9.3f}{secs:>7.0f}")


def side_logits(side: str, ids: list[int], args, out: Path) -> np.ndarray:
    """(S, V) logits of one sequence: emo-edge's bundle through `emo-edge logits`, or the GGUF in llama.cpp."""
    if side == "emo":
        proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "-q", "logits", str(args.bundle), "--ids",
                               ",".join(map(str, ids)), "--out", str(out)], capture_output=True, text=True,
                              cwd=str(ROOT))
        if proc.returncode != 0:
            raise SystemExit(f"error: bundle logits: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    else:
        r = run_worker("llama_logits", {"gguf": args.gguf.split(",")[0], "ids": ids, "n_ctx": len(ids) + 16,
                                        "threads": args.threads, "out": str(out)}, args.llama_python)
        if "error" in r:
            raise SystemExit(f"error: llama.cpp logits: {r['error']}")
    return np.load(out)


def replay(args) -> None:
    """Each side's generated tokens against the argmax of its own teacher-forced logits."""
    run = json.loads(Path(args.replay).read_text())
    prompts = [int(p) for p in args.prompts.split(",")]  # the run's order: its prompt ids came from one rng
    rng = np.random.default_rng(args.seed)
    prompt_ids = {p: [int(x) for x in rng.integers(*token_range(args.model), size=p)] for p in prompts}
    prompt_ids.update({int(p): v for p, v in run["summary"].get("prompt_ids", {}).items()})  # stored since run1
    print(f"greedy tokens of {args.replay} vs the argmax of a teacher-forced pass on the same side")
    with tempfile.TemporaryDirectory(prefix="peers-replay-", dir=args.tmp) as tmp:
        for p in prompts:
            for side in ("emo", "llama"):
                toks = run["runs"][f"{side}@{p}"][0]["tokens"]
                lg = side_logits(side, prompt_ids[p] + toks[:-1], args, Path(tmp) / f"{side}{p}.npy")
                arg = [int(np.argmax(row)) for row in lg[p - 1:]]
                same = sum(a == b for a, b in zip(arg, toks))
                first = next((i for i, (a, b) in enumerate(zip(arg, toks)) if a != b), len(toks))
                gap = max((float(row.max() - row[t]) / float(row.std()) for row, t in zip(lg[p - 1:], toks)
                           if int(np.argmax(row)) != t), default=0.0)  # how near a tie each mismatch was
                print(f"prompt {p:>5} {side:<6} {same}/{len(toks)} tokens are the argmax (first mismatch at "
                      f"{first if first < len(toks) else 'none'}; largest argmax-minus-token gap {gap:.3f} "
                      f"logit std)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="the source checkpoint")
    p.add_argument("--bundle", type=Path, required=True, help="an emo-edge bundle of it")
    p.add_argument("--gguf", required=True, help="comma-separated GGUF files of it (bench/gguf_emo.py)")
    p.add_argument("--length", type=int, default=16, help="prompt tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="scratch directory for the logits files")
    p.add_argument("--llama-python", default=LLAMA_PYTHON)
    p.add_argument("--replay", help="a peers.py --json report: check its greedy tokens instead (see above)")
    p.add_argument("--prompts", default="128,1024", help="with --replay: the run's --prompts")
    args = p.parse_args(argv)
    for what, path in [("--model", args.model / "config.json"), ("--bundle", args.bundle / "manifest.json"),
                       ("--llama-python", Path(args.llama_python))] + [("--gguf", Path(g))
                                                                        for g in args.gguf.split(",")]:
        if not path.is_file():
            p.exit(2, f"error: {what} {path}: not found\n")
    if args.length < 1:
        p.exit(2, "error: --length must be >= 1\n")
    if args.replay:
        replay(args)
    else:
        check(args)


if __name__ == "__main__":
    main()
