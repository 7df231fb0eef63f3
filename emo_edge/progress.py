"""Progress output, one implementation for every command.

- on a terminal: a tqdm bar on stderr that stays on screen when done (`leave=True`), so the next line is printed
  below it, never over it;
- stderr not a terminal (a log file, a pipe): no `\\r` bars; a start line and a done line per bar (plus one line
  per quarter of a long bar), each a plain line;
- `emo-edge --quiet ...` or `TQDM_DISABLE=1`: no bars, no progress lines, no notes (results and errors still
  print).

`bar(total, desc, unit)` returns an object with `update(n)`, `set_postfix_str(s)` and `close()` (also a context
manager); `note(text)` prints an informational line on stderr (above a running bar on a terminal).
"""

from __future__ import annotations

import os
import sys
import time

_QUIET = {"on": False}
_FALSE = ("", "0", "false", "no", "off")


def set_quiet(quiet: bool) -> None:
    _QUIET["on"] = bool(quiet)


def quiet() -> bool:
    """True under `--quiet` or when TQDM_DISABLE is set to anything but 0/false."""
    return _QUIET["on"] or os.environ.get("TQDM_DISABLE", "").strip().lower() not in _FALSE


def note(text: str) -> None:
    """An informational line on stderr (suppressed by --quiet / TQDM_DISABLE)."""
    if quiet():
        return
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


class _Silent:
    n = 0

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Lines(_Silent):
    """Plain lines for a log file: start, each quarter reached (if the bar runs over 10 s), done."""

    def __init__(self, total: float, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.t0 = time.perf_counter()
        self.quarter = 0
        self.closed = False
        self._print(f"{desc}: started" + (f" ({_count(total)} {_plural(unit, total)})" if total else ""))

    @staticmethod
    def _print(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.total:
            return
        q = int(4 * self.n / self.total)
        if q > self.quarter and q < 4 and time.perf_counter() - self.t0 > 10:
            self._print(f"{self.desc}: {25 * q}% ({_count(self.n)}/{_count(self.total)} {self.unit}, "
                        f"{time.perf_counter() - self.t0:.0f} s)")
        self.quarter = max(self.quarter, q)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print(f"{self.desc}: done ({_count(self.n)} {_plural(self.unit, self.n)} in "
                        f"{time.perf_counter() - self.t0:.1f} s)")

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and not self.closed:  # interrupted or failed: never "done"
            self.closed = True
            self._print(f"{self.desc}: stopped at {_count(self.n)}"
                        + (f"/{_count(self.total)}" if self.total else "") + f" {_plural(self.unit, self.n)} "
                        f"after {time.perf_counter() - self.t0:.1f} s")
        self.close()


def _count(n: float) -> str:
    return f"{int(n)}" if float(n).is_integer() else f"{n:.1f}"


def _plural(unit: str, n: float) -> str:
    """'1 step', '6 steps'; abbreviations ('tok', 'it', 'B') and words already plural stay as they are."""
    return unit + "s" if n != 1 and len(unit) > 3 and not unit.endswith("s") else unit


def bar(total: float | None, desc: str, unit: str = "it", unit_scale: bool = False):
    """A progress bar on stderr (see the module docstring for the three modes)."""
    if quiet():
        return _Silent()
    if not sys.stderr.isatty():
        return _Lines(total, desc, unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=True, file=sys.stderr,
                dynamic_ncols=True)


def wrap(iterable, desc: str, unit: str = "it"):
    """Iterate with a bar (total = len(iterable) when it has one)."""
    total = len(iterable) if hasattr(iterable, "__len__") else None
    with bar(total, desc, unit) as b:
        for item in iterable:
            yield item
            b.update(1)


def factory(unit: str = "tok"):
    """A `(total, desc) -> bar` callable, the shape the pool discovery and perplexity sweeps take."""
    return lambda total, desc: bar(total, desc, unit=unit, unit_scale=unit == "tok")


class Shares:
    """Spreads `total` units over `steps` calls of `next()` as whole numbers that add up to `total` exactly
    (a layer sweep over T tokens shows T tokens, not T x layers)."""

    def __init__(self, total: int, steps: int):
        self.total, self.steps, self.i, self.done = total, max(steps, 1), 0, 0

    def next(self) -> int:
        self.i = min(self.i + 1, self.steps)
        target = self.total * self.i // self.steps
        step, self.done = target - self.done, target
        return step
