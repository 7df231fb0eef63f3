"""`emo-edge run BUNDLE --prompt "..."`: stream generated text, then prefill/decode tokens per second.
Device side: onnxruntime, numpy, tokenizers, click only (no torch)."""

from __future__ import annotations

import click

from ..errors import BundleError

from .options import NEW_TOKENS, SEED, TEMPERATURE, TEXT, THREADS, TOP_P, bundle_option


def register(cli: click.Group) -> None:
    @cli.command("run")
    @bundle_option
    @click.option("--prompt", required=True, type=TEXT, help="Prompt text.")
    @click.option("--max-new-tokens", default=64, show_default=True, type=NEW_TOKENS, help="At least 1.")
    @click.option("--temperature", default=0.0, show_default=True, type=TEMPERATURE, help="0 = greedy; >= 0.")
    @click.option("--top-p", default=1.0, show_default=True, type=TOP_P, help="Nucleus sampling mass, in (0, 1].")
    @click.option("--seed", default=None, type=SEED, help="Sampling seed (>= 0).")
    @click.option("--threads", default=None, type=THREADS, help="onnxruntime intra-op threads (0 = its default).")
    def run_cmd(bundle, prompt, max_new_tokens, temperature, top_p, seed, threads):
        """Generate text from an exported bundle."""
        from ..engine import Sampling, check_prompt, open_engine
        from ..model.tokenizer import TextStream

        with open_engine(bundle, threads=threads) as eng:
            if eng.kind != "static":
                raise BundleError(f"{bundle}: a swappable bundle; chat with it (`emo-edge chat {bundle} --budget "
                                  f"...`) or serve it (`emo-edge serve {bundle}`)")
            ids = eng.encode(prompt)
            check_prompt(len(ids), eng.token_limit, eng.limit_text)  # before anything is printed
            stream = TextStream(eng.tokenizer, lambda s: click.echo(s, nl=False))
            click.echo(prompt, nl=False)
            done = eng.generate(ids, sampling=Sampling(max_new_tokens, temperature, top_p, seed),
                                on_token=stream.push)
            t = done.timings()
        end_text(prompt + stream.finish())
        if t["stop"] == "context":
            click.echo(f"stopped: context full at {t['total_tokens']} tokens (the bundle's context length)", err=True)
        click.echo(f"prefill: {t['prefill_tokens']} tokens, {t['prefill_tok_s']:.1f} tok/s; "
                   f"decode: {t['decode_tokens']} tokens, {t['decode_tok_s']:.1f} tok/s", err=True)


def end_text(text: str) -> None:
    """End the streamed text with a newline and flush stdout, so that what goes to stderr next starts a line of
    its own even when both streams share one pipe."""
    import sys

    if not text.endswith("\n"):
        click.echo("")
    sys.stdout.flush()
