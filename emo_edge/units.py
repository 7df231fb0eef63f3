"""Parsing and printing byte sizes ("4GB", "200MB", "1.5GiB")."""

from __future__ import annotations

import re

from .errors import EmoEdgeError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str | int, what: str = "size") -> int:
    """'4GB' -> 4_000_000_000 (decimal units; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise EmoEdgeError(f"{what} '{text}' is not a size (examples: 4GB, 512MB, 1.5GiB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise EmoEdgeError(f"{what} '{text}' must be positive")
    return int(value)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def parse_int_list(text: str, option: str, error: type[EmoEdgeError] = EmoEdgeError,
                   allow_empty: bool = False) -> list[int]:
    """'5,17,99' -> [5, 17, 99]; a one-line error naming the option otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise error(f"{option} '{text}' must be comma-separated integers") from None
    if not values and not allow_empty:
        raise error(f"{option} is empty")
    big = next((v for v in values if not -(1 << 62) <= v < 1 << 62), None)
    if big is not None:
        raise error(f"{option}: {str(big)[:24]}{'...' if len(str(big)) > 24 else ''} is out of range")
    return values
