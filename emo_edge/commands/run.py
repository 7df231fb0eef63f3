"""`emo-edge run BUNDLE --prompt "..."`: stream generated text, then prefill/decode tokens per second.
Device side: onnxruntime, numpy, tokenizers, click only (no torch)."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    @cli.command("run")
    @click.argument("bundle")
    @click.option("--prompt", required=True, help="Prompt text.")
    @click.option("--max-new-tokens", default=64, show_default=True, type=int)
    @click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
    @click.option("--top-p", default=1.0, show_default=True, type=float)
    @click.option("--seed", default=None, type=int)
    @click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads.")
    def run_cmd(bundle, prompt, max_new_tokens, temperature, top_p, seed, threads):
        """Generate text from an exported bundle."""
        from ..bundle import Bundle
        from ..errors import BundleError

        b = Bundle(bundle, threads=threads)
        ids = b.tokenizer.encode(prompt)
        if not ids:
            raise BundleError("the prompt encodes to no tokens")
        out: list[int] = []
        shown = [""]

        def on_token(t: int) -> None:
            out.append(t)
            text = b.tokenizer.decode(out)
            if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
                click.echo(text[len(shown[0]):], nl=False)
                shown[0] = text

        click.echo(prompt, nl=False)
        _, t = b.generate(ids, max_new_tokens, temperature, top_p, seed, on_token=on_token)
        rest = b.tokenizer.decode(out)[len(shown[0]):]
        click.echo(rest)
        click.echo(f"prefill: {t['prefill_tokens']} tokens, {t['prefill_tok_s']:.1f} tok/s; "
                   f"decode: {t['decode_tokens']} tokens, {t['decode_tok_s']:.1f} tok/s", err=True)
