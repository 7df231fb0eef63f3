"""`emo-edge chat BUNDLE --budget 2GB [--pool auto|doc|NAME] [--prompt TEXT]`: generation on a swappable bundle
with expert pools swapped from disk under a memory budget. Without --prompt, reads prompts from stdin; lines
starting with '/' are commands: /pool NAME|auto|doc, /stats, /quit. Errors inside the loop (a corrupted shard,
an unknown pool, a budget refusal) are printed and the chat keeps serving with what is resident."""

from __future__ import annotations

import sys

import click


def _stats_line(rt) -> str:
    r = rt.resident()
    budget = "none" if r["budget"] is None else f"{r['budget'] / 2**20:.0f} MiB"
    return (f"pool {r['active_pool']}: {r['active_experts']} experts ({r['active_bytes'] / 2**20:.0f} MiB) active, "
            f"{r['cached_experts']} cached ({r['cached_bytes'] / 2**20:.0f} MiB); RSS {r['rss'] / 2**20:.0f} MiB, "
            f"peak {r['peak_rss'] / 2**20:.0f} MiB, budget {budget}")


def register(cli: click.Group) -> None:
    @cli.command("chat")
    @click.argument("bundle")
    @click.option("--budget", default=None, help="Process memory budget (RSS), e.g. 2GB.")
    @click.option("--pool", "pool", default="auto", show_default=True,
                  help="auto (best catalog pool for the prompt), doc (ad-hoc pool from the prompt), a catalog "
                       "pool name, or a pool JSON file.")
    @click.option("--prompt", default=None, help="One prompt (otherwise read prompts from stdin).")
    @click.option("--max-new-tokens", default=32, show_default=True, type=int)
    @click.option("--max-tokens", default=512, show_default=True, type=int, help="KV cache reserve (tokens).")
    @click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
    @click.option("--top-p", default=1.0, show_default=True, type=float)
    @click.option("--seed", default=None, type=int)
    @click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads.")
    def chat_cmd(bundle, budget, pool, prompt, max_new_tokens, max_tokens, temperature, top_p, seed, threads):
        """Chat with a swappable bundle, swapping expert pools from disk within a memory budget."""
        from ..errors import EmoEdgeError
        from ..runtime import SwappableRuntime

        rt = SwappableRuntime(bundle, budget=budget, threads=threads, max_tokens=max_tokens,
                              progress=lambda msg: click.echo(msg, err=True))
        click.echo(f"loaded {bundle} ({rt.mechanism} swaps): pools {', '.join(rt.pools)}; backbone RSS "
                   f"{rt.backbone_rss / 2**20:.0f} MiB"
                   + (f", budget {rt.budget / 2**20:.0f} MiB (one pool needs {rt.required_bytes()['total'] / 2**20:.0f}"
                      f" MiB)" if rt.budget else ""), err=True)
        state = {"pool": pool}

        def one(text: str) -> None:
            shown = [""]
            out: list[int] = []

            def on_token(t: int) -> None:
                out.append(t)
                s = rt.tokenizer.decode(out)
                if not s.endswith("\ufffd"):
                    click.echo(s[len(shown[0]):], nl=False)
                    shown[0] = s

            res = rt.generate(text, pool=state["pool"], max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, on_token=on_token)
            click.echo(rt.tokenizer.decode(out)[len(shown[0]):])
            sw = res["swap"]
            swap = (f"; swap {sw['seconds'] * 1e3:.0f} ms, read {sw['experts_read']} experts "
                    f"({sw['bytes_read'] / 2**20:.0f} MiB), reused {sw['experts_reused']}, from cache "
                    f"{sw['experts_from_cache']}" if sw and not sw["noop"] else "")
            click.echo(f"[pool {res['pool']}: {res['reason']}{swap}; decode {res['decode_tokens']} tokens "
                       f"{res['decode_tok_s']:.1f} tok/s]", err=True)

        if prompt is not None:
            one(prompt)
            click.echo(_stats_line(rt), err=True)
            rt.close()
            return
        for line in sys.stdin:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    cmd, _, arg = line[1:].partition(" ")
                    if cmd in ("quit", "exit"):
                        break
                    if cmd == "pool":
                        arg = arg.strip()
                        if arg not in ("auto", "doc"):
                            st = rt.use(arg)
                            click.echo(f"[pool {arg}: {st.seconds * 1e3:.0f} ms, read {st.experts_read} experts]",
                                       err=True)
                        state["pool"] = arg
                    elif cmd == "stats":
                        click.echo(_stats_line(rt), err=True)
                    else:
                        click.echo("commands: /pool NAME|auto|doc, /stats, /quit", err=True)
                    continue
                one(line)
            except EmoEdgeError as exc:  # keep serving with what is resident
                click.echo(f"error: {exc}", err=True)
        rt.close()
