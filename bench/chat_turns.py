"""Time to first token per chat turn, with the prefix cache (what `emo-edge chat` does: the conversation's session
is kept between turns) and without it (every turn prefills the whole conversation), side by side in one run.

    python bench/chat_turns.py BUNDLE [--turns 10] [--rounds 3] [--max-new-tokens 24] [--pool NAME]

Each round runs the same conversation (fixed user messages, greedy answers) once with and once without the cache,
alternating which goes first, in one process on one engine per side; a turn's prompt is the whole conversation
rendered in the chat format, as `emo-edge chat` renders it. Prints per turn the prompt length, the tokens the cache
held, and the median time to first token (prefill) of each side, then turn N / turn 1 for both. Both sides must
generate the same answers (checked). Reports the machine's load average at start and end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MESSAGES = ["How long should I boil an egg?", "Why is that?", "What about a soft one?", "Any tips for peeling it?",
            "Can I keep boiled eggs in the fridge?", "For how long?", "What is a good breakfast with eggs?",
            "And a quick lunch?", "How do I make an omelette?", "Which pan should I use?", "Thanks, anything else?",
            "What about tea with it?"]


def conversation(eng, turns: int, max_new: int, pool) -> list[tuple[int, int, float, list[int]]]:
    from emo_edge.engine import Sampling
    from emo_edge.model.tokenizer import CHAT

    conv, out = [], []
    for i in range(turns):
        msg = MESSAGES[i % len(MESSAGES)]
        ids = eng.encode(CHAT.render(conv + [(msg, None)]))
        done = eng.generate(ids, pool=pool, sampling=Sampling(max_new))
        out.append((len(ids), done.cached_tokens, done.prefill_s, done.ids))
        conv.append((msg, eng.decode(done.ids).strip()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--pool", default=None, help="a swappable bundle's pool (default: what is resident)")
    args = ap.parse_args(argv)
    from emo_edge.engine import open_engine

    load0 = os.getloadavg()
    with open_engine(args.bundle) as cached, open_engine(args.bundle) as plain:
        cached.keep_prefixes(cached.session_kv_bytes(cached.token_limit), max_entries=1)
        runs = {"cache": [], "none": []}
        for r in range(args.rounds):
            order = [("cache", cached), ("none", plain)] if r % 2 == 0 else [("none", plain), ("cache", cached)]
            for name, eng in order:
                if eng.prefix_cache is not None:
                    eng.prefix_cache.clear()
                runs[name].append(conversation(eng, args.turns, args.max_new_tokens, args.pool))
    load1 = os.getloadavg()
    same = all(a[3] == b[3] for ra, rb in zip(runs["cache"], runs["none"]) for a, b in zip(ra, rb))
    print(f"{args.bundle.name}: {args.turns} turns, {args.rounds} rounds (alternating), --max-new-tokens "
          f"{args.max_new_tokens}; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end; "
          f"answers identical with and without the cache: {same}")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT cache ms':>14} {'TTFT none ms':>13} {'none/cache':>10}")
    med = {k: [statistics.median(run[t][2] for run in v) for t in range(args.turns)] for k, v in runs.items()}
    for t in range(args.turns):
        first = runs["cache"][0][t]
        print(f"{t + 1:>4} {first[0]:>7} {first[1]:>7} {med['cache'][t] * 1e3:>14.2f} {med['none'][t] * 1e3:>13.2f} "
              f"{med['none'][t] / med['cache'][t]:>10.2f}")
    last = args.turns - 1
    print(f"turn {args.turns} / turn 1 time to first token: with the cache {med['cache'][last] / med['cache'][0]:.2f}x, "
          f"without {med['none'][last] / med['none'][0]:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
