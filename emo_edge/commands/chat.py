"""`emo-edge chat BUNDLE --budget 2GB [--pool auto|doc|NAME] [--prompt TEXT]`: a conversation with a bundle (a
swappable one swaps expert pools from disk under a memory budget; a static one has its one pool). Without --prompt, reads messages at a "> " prompt
(stdin); lines starting with '/' are commands (COMMANDS). The conversation is rendered with the model's chat
format (`tokenizer.CHAT`) and kept within the context, oldest turns dropped first (with a notice). Ctrl-C while
an answer is written cancels that answer; Ctrl-C at the prompt or Ctrl-D ends the chat. Errors inside the loop (a
corrupted shard, an unknown pool, a budget refusal) are printed and the chat keeps serving with what is
resident."""

from __future__ import annotations

import signal
import threading

import click

from ..units import fmt_bytes
from .options import NEW_TOKENS, POSITIVE, SEED, TEMPERATURE, TEXT, THREADS, TOP_P, bundle_option

COMMANDS = (
    ("/help", "list these commands"),
    ("/pool NAME", "pin a catalog pool (or a pool JSON file)"),
    ("/pool auto|doc", "choose per message: best catalog pool / ad-hoc top-N pool"),
    ("/stats", "resident experts, RSS and budget"),
    ("/reset", "forget the conversation so far"),
    ("/quit", "end the chat (also /exit, Ctrl-D, or Ctrl-C at the prompt)"),
)
INPUT_HELP = ("End a line with a backslash (\\) to continue the message on the next line.\n"
              "Ctrl-C while an answer is being written cancels that answer.")


def help_text() -> str:
    width = max(len(c) for c, _ in COMMANDS)
    return "\n".join([f"  {c:<{width}}  {what}" for c, what in COMMANDS] + [INPUT_HELP])


def _stats_line(rt) -> str:
    if rt.kind != "swappable":
        st = rt.stats()
        return (f"pool {rt.resident_pool()}: {st['resident_experts']} experts (static bundle); RSS "
                f"{fmt_bytes(st['rss'])}, peak {fmt_bytes(st['peak_rss'])}")
    r = rt.resident()
    budget = "none" if r["budget"] is None else f"{fmt_bytes(r['budget'])}"
    return (f"pool {r['active_pool']}: {r['active_experts']} experts ({fmt_bytes(r['active_bytes'])}) active, "
            f"{r['cached_experts']} cached ({fmt_bytes(r['cached_bytes'])}); RSS {fmt_bytes(r['rss'])}, "
            f"peak {fmt_bytes(r['peak_rss'])}, budget {budget}")


class Conversation:
    """The turns so far, rendered with the chat format and fitted into `limit` tokens with room for the answer."""

    def __init__(self, tokenizer, limit: int, max_new_tokens: int):
        from ..model.tokenizer import CHAT

        self.fmt, self.tok, self.limit, self.max_new = CHAT, tokenizer, limit, max_new_tokens
        self.turns: list[tuple[str, str]] = []

    def prompt(self, message: str) -> tuple[list[int], int]:
        """Token ids for the next answer to `message`; drops the oldest turns while the prompt plus
        --max-new-tokens would not fit. Returns (ids, turns dropped)."""
        from ..errors import BundleError

        room = self.limit - self.max_new
        dropped = 0
        while True:
            ids = self.tok.encode(self.fmt.render(self.turns + [(message, None)]))
            if len(ids) <= room:
                return ids, dropped
            if not self.turns:
                raise BundleError(f"the message is {len(ids)} tokens with the chat format; with --max-new-tokens "
                                  f"{self.max_new} it does not fit the context ({self.limit} tokens)")
            self.turns.pop(0)
            dropped += 1


def _answer(rt, conv: Conversation, message: str, state: dict, opts: dict) -> None:
    """One turn: fit the conversation, generate under the pool (auto/doc: chosen from this message alone),
    stream the answer; Ctrl-C meanwhile cancels it."""
    from ..model.tokenizer import TextStream
    from .run import end_text

    ids, dropped = conv.prompt(message)
    if dropped:
        click.echo(f"[context: dropped the {dropped} oldest turn(s) to fit {conv.limit} tokens]", err=True)
    started = [False]

    def write(s: str) -> None:  # the answer follows "Assistant:"; its leading space is the format's
        if not started[0]:
            s = s.lstrip()
            started[0] = bool(s)
        if s:
            click.echo(s, nl=False)

    stream = TextStream(rt.tokenizer, write, stop=conv.fmt.stop)
    cancel = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *_: cancel.set()) if opts["interactive"] else None
    try:
        res = rt.generate(ids, pool=state["pool"], sampling=opts["gen"],
                          on_token=lambda t: stream.push(t) or cancel.is_set(),
                          choose_on=rt.tokenizer.encode(message)).to_dict()
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    raw = stream.finish()
    end_text(raw if started[0] else "")
    reply = raw.strip()
    if cancel.is_set():
        click.echo("[cancelled]", err=True)
    else:
        conv.turns.append((message, reply))
    if res["stop"] == "context":
        click.echo(f"stopped: context full at {res['total_tokens']} tokens", err=True)
    sw = res["swap"]
    swap = (f"; swap {sw['seconds'] * 1e3:.0f} ms, read {sw['experts_read']} experts "
            f"({fmt_bytes(sw['bytes_read'])}), reused {sw['experts_reused']}, from cache "
            f"{sw['experts_from_cache']}" if sw and not sw["noop"] else "")
    cached = f"; {res['cached_tokens']} kept from the last turn" if res["cached_tokens"] else ""
    click.echo(f"[pool {res['pool']}: {res['reason']}{swap}; prompt {res['prefill_tokens'] + res['cached_tokens']} "
               f"tokens ({len(conv.turns)} turn(s) in context){cached}; first token {res['ttft_s'] * 1e3:.0f} ms; decode {res['decode_tokens']} tokens "
               f"{res['decode_tok_s']:.1f} tok/s]", err=True)


def _read_message() -> str | None:
    """One message from the "> " prompt (backslash-continued lines joined); None at end of input."""
    lines, prompt = [], "> "
    while True:
        try:
            line = input(prompt)
        except EOFError:
            return "\n".join(lines) if lines else None
        if line.endswith("\\"):
            lines.append(line[:-1])
            prompt = ". "
            continue
        lines.append(line)
        return "\n".join(lines)


def _command(rt, line: str, state: dict, conv: Conversation) -> bool:
    """Run a /command; False means quit."""
    cmd, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if cmd in ("quit", "exit"):
        return False
    if cmd == "pool" and arg:
        if arg not in ("auto", "doc"):
            st = rt.use(arg)
            click.echo(f"[pool {arg}: {st.seconds * 1e3:.0f} ms, read {st.experts_read} experts]", err=True)
        state["pool"] = arg
    elif cmd == "stats":
        click.echo(_stats_line(rt), err=True)
    elif cmd == "reset":
        conv.turns.clear()
        click.echo("[conversation cleared]", err=True)
    else:
        click.echo(("" if cmd == "help" else f"unknown command '/{cmd}'; ") + "commands:\n" + help_text(), err=True)
    return True


def _loop(rt, conv: Conversation, state: dict, opts: dict) -> None:
    from ..errors import EmoEdgeError

    try:
        import readline  # noqa: F401  line editing and history for input() on a terminal
    except ImportError:  # pragma: no cover - not on every platform
        pass
    while True:
        try:
            text = _read_message()
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat
            click.echo("", err=True)
            return
        if text is None:
            return
        if not text.strip():
            continue
        try:
            if text.startswith("/"):
                if not _command(rt, text.strip(), state, conv):
                    return
                continue
            _answer(rt, conv, text, state, opts)
        except EmoEdgeError as exc:  # keep serving with what is resident
            click.echo(f"error: {exc}", err=True)


def register(cli: click.Group) -> None:
    @cli.command("chat", help="Chat with a bundle; a swappable one swaps expert pools from disk within a memory "
                              "budget.\n\n\b\nCommands at the \"> \" prompt:\n" + help_text())
    @bundle_option
    @click.option("--budget", default=None, help="Process memory budget (RSS), e.g. 2GB.")
    @click.option("--pool", "pool", default="auto", show_default=True,
                  help="auto (best catalog pool for each message), doc (ad-hoc pool from each message), a catalog "
                       "pool name, or a pool JSON file.")
    @click.option("--prompt", default=None, type=TEXT, help="One message (otherwise a conversation on stdin).")
    @click.option("--max-new-tokens", default=32, show_default=True, type=NEW_TOKENS,
                  help="Tokens per answer, fewer than the context.")
    @click.option("--max-tokens", default=512, show_default=True, type=POSITIVE, help="KV cache reserve (tokens).")
    @click.option("--temperature", default=0.0, show_default=True, type=TEMPERATURE, help="0 = greedy; >= 0.")
    @click.option("--top-p", default=1.0, show_default=True, type=TOP_P, help="Nucleus sampling mass, in (0, 1].")
    @click.option("--seed", default=None, type=SEED, help="Sampling seed (>= 0).")
    @click.option("--threads", default=None, type=THREADS, help="onnxruntime intra-op threads (0 = its default).")
    def chat_cmd(bundle, budget, pool, prompt, max_new_tokens, max_tokens, temperature, top_p, seed, threads):
        import sys

        from ..engine import Sampling, open_engine
        from ..errors import BundleError

        rt = open_engine(bundle, budget=budget, threads=threads, max_tokens=max_tokens,
                         progress=lambda msg: click.echo(msg, err=True))
        try:
            if max_new_tokens >= rt.token_limit:
                raise BundleError(f"--max-new-tokens {max_new_tokens}: must be below the context ({rt.token_limit}"
                                  f" tokens{'' if rt.token_limit == rt.context else ', --max-tokens'}), which must "
                                  f"also hold the conversation")
            if rt.kind == "swappable":
                click.echo(f"loaded {bundle} ({rt.mechanism} swaps): pools {', '.join(rt.pools)}; backbone RSS "
                           f"{fmt_bytes(rt.backbone_rss)}"
                           + (f", budget {fmt_bytes(rt.budget)} (one pool needs "
                              f"{fmt_bytes(rt.required_bytes()['total'])})" if rt.budget else ""), err=True)
            else:
                note = "; --budget applies to swappable bundles only" if budget else ""
                click.echo(f"loaded {bundle} (static bundle of pool {rt.pool_name}; RSS "
                           f"{fmt_bytes(rt.stats()['rss'])}{note})", err=True)
            # one conversation: its session is kept between turns, so a turn prefills its new tokens only
            rt.keep_prefixes(rt.session_kv_bytes(rt.token_limit), max_entries=1)
            conv = Conversation(rt.tokenizer, rt.token_limit, max_new_tokens)
            state = {"pool": pool}
            opts = {"interactive": prompt is None,
                    "gen": Sampling(max_new_tokens, temperature, top_p, seed)}
            if prompt is not None:
                _answer(rt, conv, prompt, state, opts)
                click.echo(_stats_line(rt), err=True)
                return
            if sys.stdin.isatty():
                click.echo("type /help for commands", err=True)
            _loop(rt, conv, state, opts)
        finally:
            rt.close()
