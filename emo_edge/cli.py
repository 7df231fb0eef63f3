"""The emo-edge command line. Each command group lives in `emo_edge/commands/<name>.py` and is listed in
`COMMAND_MODULES`; user errors (`EmoEdgeError`, and a subcommand's usage errors such as `--top-p 1.5`) print one
line `error: ...` and exit with status 2. Options shared by several commands live in `commands/options.py`.

Only click, numpy and the light parts of emo_edge are imported here: torch and onnx are imported by the stage
that needs them, so a mistyped argument fails at once."""

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
    "emo_edge.commands.serve",
]


class Cli(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EmoEdgeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:  # one line, as for every other user error
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {' '.join(exc.format_message().split())}{where}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="emo-edge")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes on stderr (results and errors still "
              "print); TQDM_DISABLE=1 also turns progress off. Give it before the command: emo-edge -q export ...")
def cli(verbose: bool, quiet: bool) -> None:
    """emo-edge: put EMO mixture-of-experts models on laptops."""
    from .progress import set_quiet

    set_quiet(quiet)
    logging.basicConfig(level=logging.INFO if verbose and not quiet else logging.WARNING, format="%(message)s")


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(cli)


def main() -> None:
    cli(prog_name="emo-edge")
