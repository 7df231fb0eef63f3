"""The emo-edge command line. Each command group lives in `emo_edge/commands/<name>.py` and is listed in
`COMMAND_MODULES`; user errors (`EmoEdgeError`) print one line and exit with status 2."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from . import __version__
from .errors import EmoEdgeError

COMMAND_MODULES = [
    "emo_edge.commands.inspect",
    "emo_edge.commands.synth",
    "emo_edge.commands.logits",
    "emo_edge.commands.export",
    "emo_edge.commands.run",
    "emo_edge.commands.pools",
    "emo_edge.commands.eval",
    "emo_edge.commands.chat",
]


class Cli(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EmoEdgeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="emo-edge")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose: bool) -> None:
    """emo-edge: put EMO mixture-of-experts models on laptops."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(cli)


def main() -> None:
    cli(prog_name="emo-edge")
