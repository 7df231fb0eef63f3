"""Exact-answer task templates: what users type and what the held-out accuracy sets hold.

Three families, each a (prompt, worked completion, answer) generator seeded by the caller:
- equations: `Solve for x: {a}x + {b} = {c}.` / `Solve for x: {a}x - {b} = {c}.` (a in 2..9, x in 0..12,
  b in 1..30); the completion's last statement is `x = {x}`. Two working styles: "short" (each step's result at
  once: the pretraining stage) and "column" (the middle step digit by digit: the anneal stage, see train/data.py).
- arithmetic: `What is {m} + {n}?`, `What is {m} - {n}?` (m, n <= 999, no negative result), `What is {m} * {n}?`
  (m <= 99, n <= 9); the completion works column by column and its last integer is the result.
- code: a Python REPL transcript `>>> def NAME(ARG):` / `...     return EXPR` / `...` / `>>> NAME(VALUE)`; the next
  line is the repr of the value. Bodies: affine maps, squares, floor division over ints; upper, reverse and len over
  strings (drawn from `WORDS`, a closed list the model has learned to spell); sum, max - min and a scaling
  comprehension over lists of digits.

Training documents hold one task each (a document ends after its answer), so greedy generation from a prompt
stops at the end of its answer. `heldout_tasks` writes the evaluation sets from seeds disjoint from training, and
training drops every document whose prompt is in them.
"""

from __future__ import annotations

import random

EXTRACT = {"equations": "last_x", "arithmetic": "last_int", "code": "first_line"}
TASK_FAMILIES = tuple(EXTRACT)
TASK_DOMAIN = {"equations": "math", "arithmetic": "math", "code": "code"}

ARGS = ["n", "x", "k", "v", "num", "val", "count", "size", "total", "item", "s", "word", "xs", "nums", "items",
        "digits", "values", "data", "text", "name"]
FNAMES = ["f", "g", "h", "calc", "step", "scale", "shift", "square", "half", "part", "shout", "flip", "size_of",
          "total", "spread", "grow", "apply", "area", "score", "bump", "twice", "mirror", "measure", "loud"]
WORDS = ["cat", "dog", "sun", "tree", "book", "lamp", "road", "ship", "star", "moon", "bird", "fish", "rain",
         "snow", "wind", "leaf", "rock", "sand", "wave", "fire", "gold", "iron", "milk", "salt", "rose", "king",
         "queen", "house", "river", "apple", "bread", "chair", "table", "cloud", "storm", "light", "night", "water",
         "stone", "green", "plant", "train", "paper", "music", "smile", "dream", "earth", "ocean", "tiger", "zebra",
         "lemon", "mango", "piano", "robot", "pixel", "data", "code", "byte", "node", "user", "item", "value",
         "token", "cache", "queue", "list", "path", "file", "line", "word", "hello", "world", "python", "garden",
         "window", "yellow", "purple", "silver", "winter", "summer", "planet", "rocket", "banana", "cherry"]


def _digits_add(m: int, n: int) -> str:
    a, b = str(m)[::-1], str(n)[::-1]
    width = max(len(a), len(b))
    lines, digits, carry = [], "", 0
    for i in range(width):
        x, y = int(a[i]) if i < len(a) else 0, int(b[i]) if i < len(b) else 0
        s = x + y + carry
        expr = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry, d = divmod(s, 10)
        digits = str(d) + digits
        lines.append(f"{expr} = {s}. Digits: {digits}." + (f" Carry {carry}." if carry else ""))
    if carry:
        digits = str(carry) + digits
        lines.append(f"Digits: {digits}.")
    return "\n".join(lines)


def _digits_sub(m: int, n: int) -> str:
    a, b = str(m)[::-1], str(n)[::-1]
    lines, digits, borrow = [], "", 0
    for i in range(len(a)):
        x, y = int(a[i]), int(b[i]) if i < len(b) else 0
        top = x - borrow
        expr = f"{x} - {y}" + (f" - {borrow}" if borrow else "")
        if top < y:
            d, borrow = top + 10 - y, 1
            line = f"{expr}: borrow, {top + 10} - {y} = {d}. Digits: {d}{digits}. Borrow 1."
        else:
            d, borrow = top - y, 0
            line = f"{expr} = {d}. Digits: {d}{digits}."
        digits = str(d) + digits
        lines.append(line)
    return "\n".join(lines)


def _digits_mul(m: int, n: int) -> str:
    a = str(m)[::-1]
    lines, digits, carry = [], "", 0
    for i in range(len(a)):
        x = int(a[i])
        p = x * n + carry
        expr = f"{x} * {n}" + (f" + {carry}" if carry else "")
        carry, d = divmod(p, 10)
        digits = str(d) + digits
        lines.append(f"{expr} = {p}. Digits: {digits}." + (f" Carry {carry}." if carry else ""))
    if carry:
        digits = str(carry) + digits
        lines.append(f"Digits: {digits}.")
    return "\n".join(lines)


def equation(rng: random.Random, style: str = "short") -> tuple[str, str, str]:
    """`style` "short" states each step's result at once (`6x = 80 - 8 = 72.`); "column" works the middle step
    out digit by digit, in the arithmetic family's format, before dividing. Both draw the same numbers."""
    a, x, b = rng.randint(2, 9), rng.randint(0, 12), rng.randint(1, 30)
    plus = rng.random() < 0.5
    c = a * x + b if plus else a * x - b
    prompt = f"Solve for x: {a}x {'+' if plus else '-'} {b} = {c}."
    if style == "short":
        step = (f"Subtract {b} from both sides: {a}x = {c} - {b} = {a * x}." if plus else
                f"Add {b} to both sides: {a}x = {c} + {b} = {a * x}.")
    else:
        if plus:
            step = f"Subtract {b} from both sides: {a}x = {c} - {b}.\n{_digits_sub(c, b)}"
        elif c < 0:
            step = f"Add {b} to both sides: {a}x = {c} + {b} = {b} - {-c}.\n{_digits_sub(b, -c)}"
        else:
            step = f"Add {b} to both sides: {a}x = {c} + {b}.\n{_digits_add(c, b)}"
        step += f"\n{a}x = {a * x}."
    body = f"{step}\nDivide both sides by {a}: x = {a * x} / {a} = {x}.\nx = {x}"
    return prompt, body, str(x)


def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    op = rng.randrange(3)
    if op == 2:
        m, n = rng.randint(0, 99), rng.randint(0, 9)
        r, work = m * n, _digits_mul(m, n)
        sym = "*"
    else:
        # a spread of lengths: 1-, 2- and 3-digit operands
        m, n = (rng.randint(0, 10 ** rng.randint(1, 3) - 1) for _ in range(2))
        if op == 1:
            m, n = max(m, n), min(m, n)
            r, work, sym = m - n, _digits_sub(m, n), "-"
        else:
            r, work, sym = m + n, _digits_add(m, n), "+"
    return f"What is {m} {sym} {n}?", f"{work}\n{m} {sym} {n} = {r}", str(r)


def _code_body(rng: random.Random, arg: str) -> tuple[str, str, object]:
    """(expression, call argument source, value) for one one-line function body."""
    kind = rng.randrange(9)
    if kind == 0:
        a, b, v = rng.randint(2, 9), rng.randint(0, 20), rng.randint(0, 12)
        if rng.random() < 0.5:
            return f"{a} * {arg} + {b}", str(v), a * v + b
        return f"{arg} * {a} + {b}", str(v), v * a + b
    if kind == 1:
        v = rng.randint(0, 15)
        return (f"{arg} * {arg}" if rng.random() < 0.5 else f"{arg} ** 2"), str(v), v * v
    if kind == 2:
        k, v = rng.randint(2, 9), rng.randint(0, 99)
        return f"{arg} // {k}", str(v), v // k
    w = rng.choice(WORDS)
    if kind == 3:
        return f"{arg}.upper()", repr(w), w.upper()
    if kind == 4:
        return f"{arg}[::-1]", repr(w), w[::-1]
    if kind == 5:
        return f"len({arg})", repr(w), len(w)
    xs = [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
    if kind == 6:
        return f"sum({arg})", repr(xs), sum(xs)
    if kind == 7:
        return f"max({arg}) - min({arg})", repr(xs), max(xs) - min(xs)
    k = rng.randint(2, 4)
    d = rng.choice(["d", "i", "e"])
    return f"[{k} * {d} for {d} in {arg}]", repr(xs), [k * e for e in xs]


def code(rng: random.Random) -> tuple[str, str, str]:
    name, arg = rng.choice(FNAMES), rng.choice(ARGS)
    expr, value_src, value = _code_body(rng, arg)
    prompt = f">>> def {name}({arg}):\n...     return {expr}\n...\n>>> {name}({value_src})\n"
    return prompt, repr(value), repr(value)


GENERATORS = {"equations": equation, "arithmetic": arithmetic, "code": code}


def task_document(family: str, rng: random.Random, style: str = "short") -> tuple[str, str]:
    """(prompt, training document) for one task: the document is the prompt, its completion and nothing else;
    `style` is the equations' working (see `equation`)."""
    prompt, body, _ = equation(rng, style) if family == "equations" else GENERATORS[family](rng)
    if family == "code":
        return prompt, prompt + body + "\n"
    return prompt, f"{prompt}\n{body}"


def heldout_tasks(family: str, n: int) -> list[dict]:
    """`n` distinct held-out items of `family` (seeds disjoint from training), in the task-file format."""
    rng = random.Random(880_000 + TASK_FAMILIES.index(family))
    seen, out = set(), []
    while len(out) < n:
        prompt, _, answer = GENERATORS[family](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "answer": answer, "extract": EXTRACT[family]})
    return out


def training_tasks(family: str, n: int, exclude: set[str], seed: int, style: str = "short") -> list[str]:
    """`n` training documents of `family` whose prompts are not in `exclude` (the held-out prompts)."""
    rng = random.Random(seed * 7919 + TASK_FAMILIES.index(family))
    out = []
    while len(out) < n:
        prompt, doc = task_document(family, rng, style)
        if prompt not in exclude:
            out.append(doc)
    return out
