"""Options shared by the commands, so that each means one thing everywhere.

- `model_option`: `--model CKPT` on every command that reads a checkpoint, with the old positional MODEL kept as
  an alias; the decorated function receives `model` (None: `emo_edge.model.locate.resolve_model` picks the default).
- number types that refuse NaN/inf and out-of-range values as a usage error naming the option and the value
  (the CLI prints usage errors as one line `error: ...`, exit status 2): `TEMPERATURE`, `TOP_P`, `SEED`,
  `THREADS`, `NEW_TOKENS`, `POSITIVE`, `NON_NEGATIVE`.
- `check_pool_names`: every name of a --pools/--pool list known (catalog, built-in domain, pool file) before
  anything is discovered or imported.
- `BUDGET_HELP` and `parse_budget`: `--budget` is the process memory budget (RSS) the plan and the runtime
  honour; an empty value is an error, never "no budget".
"""

from __future__ import annotations

import functools
import math

import click

from ..errors import BudgetError, EmoEdgeError, PoolError

BUDGET_HELP = ("Process memory budget (peak RSS) the bundle must run in: weights + KV cache + runtime overhead, "
               "e.g. 4GB (decimal units; GiB/MiB binary).")


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (a NaN compares false with every bound)."""

    name = "number"

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if math.isnan(v) or math.isinf(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


class Utf8Text(click.ParamType):
    """Text that is valid UTF-8: bytes that are not (a shell's $'\\xff') reach Python as lone surrogates, which
    no tokenizer accepts; refused here in one line naming the option and the first bad byte."""

    name = "text"

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                bad = value[exc.start]
                byte = f"0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else repr(bad)
                self.fail(f"not valid UTF-8 text (byte {byte} at character {exc.start})", param, ctx)
        return value


TEXT = Utf8Text()
TEMPERATURE = FiniteFloatRange(min=0.0)  # 0 = greedy
TOP_P = FiniteFloatRange(min=0.0, max=1.0, min_open=True)
SEED = click.IntRange(min=0, max=2**32 - 1)
THREADS = click.IntRange(min=0, max=4096)  # 0 = onnxruntime's default
NEW_TOKENS = click.IntRange(min=1)
POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)


def parse_budget(text: str | None) -> int | None:
    """None -> None (no budget); '4GB' -> bytes; '' or garbage -> BudgetError naming --budget."""
    if text is None:
        return None
    from ..units import parse_size

    try:
        return parse_size(text, "--budget")
    except BudgetError:
        raise
    except EmoEdgeError as exc:
        raise BudgetError(str(exc)) from None


def model_option(func):
    """Adds `[MODEL]` (positional alias) and `--model CKPT`; passes `model` to the command."""

    @click.argument("model_arg", required=False, metavar="[MODEL]")
    @click.option("--model", "model_opt", default=None, metavar="CKPT",
                  help="Checkpoint directory [default: $EMO_EDGE_MODEL, a cached allenai/Emo_1b14b_1T, or the "
                       "embedded emo-tiny]; a positional MODEL is the same.")
    @functools.wraps(func)
    def wrapper(*args, model_arg=None, model_opt=None, **kwargs):
        if model_arg is not None and model_opt is not None and model_arg != model_opt:
            raise EmoEdgeError(f"the model is given twice: positional '{model_arg}' and --model '{model_opt}'; "
                               f"give one")
        return func(*args, model=model_opt if model_opt is not None else model_arg, **kwargs)

    return wrapper


def bundle_option(func):
    """Adds `BUNDLE` (positional) and `--model BUNDLE` (the same, as every command that reads a model takes it);
    passes `bundle`. A path that does not exist, or is not a directory, is one line saying so."""

    @click.argument("bundle_arg", required=False, metavar="BUNDLE")
    @click.option("--model", "model_opt", default=None, metavar="BUNDLE",
                  help="The bundle directory (a positional BUNDLE is the same).")
    @functools.wraps(func)
    def wrapper(*args, bundle_arg=None, model_opt=None, **kwargs):
        import os

        from ..errors import BundleError

        if bundle_arg is not None and model_opt is not None and bundle_arg != model_opt:
            raise EmoEdgeError(f"the bundle is given twice: positional '{bundle_arg}' and --model '{model_opt}'; "
                               f"give one")
        bundle = model_opt if model_opt is not None else bundle_arg
        if bundle is None:
            raise EmoEdgeError("give a bundle directory (BUNDLE or --model BUNDLE; `emo-edge export` makes one)")
        if not os.path.lexists(bundle):
            raise BundleError(f"{bundle}: does not exist")
        if not os.path.isdir(bundle):
            raise BundleError(f"{bundle}: not a directory (a bundle is the directory `emo-edge export` writes)")
        return func(*args, bundle=bundle, **kwargs)

    return wrapper


def check_pool_names(view, text: str, option: str, catalog=None, allow_all: bool = False) -> list[str]:
    """The names of a comma-separated pool list, each one known (a catalog entry, a built-in domain, or a pool
    file that fits the model) before anything is discovered; an unknown name lists the known ones."""
    from ..pools import BUILTIN_DOMAINS, Catalog, load_pool_path
    from ..pools.catalog import _looks_like_file, check_name

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise PoolError(f"{option} '{text}' names no pool (e.g. {option} math,code)")
    if allow_all and "all" in names:
        if names != ["all"]:
            raise PoolError(f"{option}: 'all' (every expert) cannot be combined with named pools")
        return names
    cat = Catalog(view, catalog)
    for name in names:
        if _looks_like_file(name):
            load_pool_path(name, view)
        elif check_name(name) not in BUILTIN_DOMAINS and cat.get(name) is None:
            known = sorted({p.name for p in cat.entries()[0]} | set(BUILTIN_DOMAINS))
            raise PoolError(f"{option}: unknown pool '{name}' (known: {', '.join(known)}; or give a pool .json "
                            f"file)")
    return names
