"""Project-written generators for the five training domains: math, code, prose, chat, records.

Every document is produced from a `random.Random` seeded by the caller, so a (domain, seed, index) triple always
gives the same text. Nothing here reads files: all words, templates and structures are written in this module.
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from typing import Callable

# ---------------------------------------------------------------------------------------------------------
# shared word lists
NAMES = ["Alice", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wes", "Xena", "Yusuf",
         "Zoe", "Marta", "Omar", "Priya", "Leo"]
ITEMS = ["apples", "pencils", "books", "marbles", "tickets", "cookies", "stickers", "oranges", "bottles", "cards",
         "tiles", "eggs", "coins", "boxes", "chairs", "plants", "shirts", "candles", "bricks", "notebooks"]
PLACES = ["the harbor", "the old market", "the northern valley", "a small village", "the river bank", "the city square",
          "the quiet library", "the mountain pass", "the train station", "the edge of the forest", "the coast",
          "the garden", "the museum", "the university", "the farm", "the bridge", "the lighthouse", "the plateau"]
ADJ = ["quiet", "ancient", "bright", "narrow", "crowded", "gentle", "cold", "golden", "distant", "familiar", "strange",
       "heavy", "patient", "restless", "careful", "broad", "hidden", "simple", "curious", "steady", "pale", "warm",
       "modest", "sudden", "open", "forgotten", "early", "late", "green", "grey"]
NOUN = ["river", "village", "teacher", "journey", "storm", "window", "letter", "road", "garden", "machine", "season",
        "question", "market", "forest", "harbor", "painting", "family", "winter", "idea", "bridge", "city", "song",
        "field", "library", "ship", "mountain", "friend", "lamp", "festival", "traveler", "farmer", "child", "crowd",
        "tower", "island", "story", "evening", "morning", "valley", "kitchen"]
VERB_T = ["carried", "watched", "remembered", "followed", "opened", "crossed", "described", "noticed", "built",
          "repaired", "visited", "painted", "discovered", "explained", "studied", "measured", "welcomed", "left",
          "found", "shared", "answered", "changed", "protected", "admired"]
VERB_I = ["waited", "laughed", "wandered", "returned", "slept", "listened", "hesitated", "arrived", "vanished",
          "worked", "rested", "spoke", "paused", "smiled", "grew", "travelled"]
ADV = ["slowly", "quietly", "suddenly", "carefully", "often", "rarely", "eagerly", "patiently", "finally", "again",
       "softly", "gladly", "almost", "still"]
CONN = ["However,", "Meanwhile,", "Later,", "Even so,", "In the end,", "At first,", "For a while,", "Afterwards,",
        "By then,", "Still,", "Years later,", "That evening,", "Because of this,", "In time,"]


def _pick(rng: random.Random, xs):
    return xs[rng.randrange(len(xs))]


# ---------------------------------------------------------------------------------------------------------
# math: worked arithmetic and algebra solutions
def _m_word(rng):
    n, p, k = rng.randint(3, 40), rng.randint(2, 15), rng.randint(2, 6)
    who, item = _pick(rng, NAMES), _pick(rng, ITEMS)
    spent = n * p
    q = f"{who} buys {n} {item} at {p} dollars each and then buys {k} more packs of the same size. How much is spent in total?"
    s = (f"One pack costs {n} * {p} = {spent} dollars.\n"
         f"There are 1 + {k} = {k + 1} packs in total.\n"
         f"Total cost: {k + 1} * {spent} = {(k + 1) * spent} dollars.\nAnswer: {(k + 1) * spent}")
    return q, s


def _m_mult(rng):
    a, b = rng.randint(12, 999), rng.randint(11, 99)
    t, u = divmod(b, 10)
    return (f"Compute {a} * {b}.",
            f"Split {b} = {t * 10} + {u}.\n{a} * {t * 10} = {a * t * 10}.\n{a} * {u} = {a * u}.\n"
            f"Add the parts: {a * t * 10} + {a * u} = {a * b}.\nAnswer: {a * b}")


def _m_frac(rng):
    a, b, c, d = rng.randint(1, 9), rng.randint(2, 12), rng.randint(1, 9), rng.randint(2, 12)
    r = Fraction(a, b) + Fraction(c, d)
    lcd = b * d // __import__("math").gcd(b, d)
    return (f"Add the fractions {a}/{b} + {c}/{d}.",
            f"The least common denominator of {b} and {d} is {lcd}.\n"
            f"{a}/{b} = {a * lcd // b}/{lcd} and {c}/{d} = {c * lcd // d}/{lcd}.\n"
            f"Sum: ({a * lcd // b} + {c * lcd // d})/{lcd} = {a * lcd // b + c * lcd // d}/{lcd}.\n"
            f"Simplify: {r.numerator}/{r.denominator}.\nAnswer: {r.numerator}/{r.denominator}")


def _m_quad(rng):
    r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
    b, c = -(r1 + r2), r1 * r2

    def term(v, s):
        return "" if v == 0 else (f" + {v}{s}" if v > 0 else f" - {-v}{s}")
    eq = f"x^2{term(b, 'x')}{term(c, '')} = 0"
    f1 = f"(x {'-' if r1 >= 0 else '+'} {abs(r1)})"
    f2 = f"(x {'-' if r2 >= 0 else '+'} {abs(r2)})"
    return (f"Solve the quadratic equation {eq}.",
            f"We look for two numbers whose product is {c} and whose sum is {-b}: they are {r1} and {r2}.\n"
            f"So the equation factors as {f1}{f2} = 0.\n"
            f"Each factor can be zero: x = {r1} or x = {r2}.\nAnswer: x = {min(r1, r2)}, x = {max(r1, r2)}")


def _m_system(rng):
    x, y = rng.randint(-8, 12), rng.randint(-8, 12)
    a1, b1, a2, b2 = rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 5), -rng.randint(1, 5)
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    return (f"Solve the system: {a1}x + {b1}y = {c1} and {a2}x - {-b2}y = {c2}.",
            f"Multiply the first equation by {a2} and the second by {a1}:\n"
            f"{a1 * a2}x + {b1 * a2}y = {c1 * a2}\n{a1 * a2}x - {-b2 * a1}y = {c2 * a1}\n"
            f"Subtract: {b1 * a2 - b2 * a1}y = {c1 * a2 - c2 * a1}, so y = {y}.\n"
            f"Substitute into the first equation: {a1}x + {b1 * y} = {c1}, so {a1}x = {c1 - b1 * y} and x = {x}.\n"
            f"Answer: x = {x}, y = {y}")


def _m_percent(rng):
    p, n = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 75]), rng.randint(2, 90) * 10
    v = n * p / 100
    vs = int(v) if v == int(v) else v
    return (f"What is {p}% of {n}? After a discount of {p}%, what price remains from {n}?",
            f"{p}% means {p}/100 = {p / 100}.\n{p / 100} * {n} = {vs}.\n"
            f"The remaining price is {n} - {vs} = {n - v if v != int(v) else n - int(v)}.\n"
            f"Answer: {vs}; remaining {n - v if v != int(v) else n - int(v)}")


def _m_order(rng):
    a, b, c, d = (rng.randint(2, 20) for _ in range(4))
    return (f"Evaluate {a} + {b} * ({c} - {d}).",
            f"Parentheses first: {c} - {d} = {c - d}.\nThen multiplication: {b} * {c - d} = {b * (c - d)}.\n"
            f"Then addition: {a} + {b * (c - d)} = {a + b * (c - d)}.\nAnswer: {a + b * (c - d)}")


def _m_sequence(rng):
    a, d, n = rng.randint(-5, 20), rng.randint(2, 9), rng.randint(8, 30)
    last = a + (n - 1) * d
    return (f"Find the sum of the first {n} terms of the arithmetic sequence {a}, {a + d}, {a + 2 * d}, ...",
            f"The common difference is d = {d}.\nThe {n}th term is {a} + ({n} - 1) * {d} = {last}.\n"
            f"The sum is n * (first + last) / 2 = {n} * ({a} + {last}) / 2 = {n * (a + last) // 2}.\n"
            f"Answer: {n * (a + last) // 2}")


def _m_area(rng):
    w, h = rng.randint(3, 40), rng.randint(3, 40)
    return (f"A rectangle is {w} cm wide and {h} cm tall. Find its area and perimeter.",
            f"Area = width * height = {w} * {h} = {w * h} square cm.\n"
            f"Perimeter = 2 * (width + height) = 2 * ({w} + {h}) = {2 * (w + h)} cm.\n"
            f"Answer: area {w * h}, perimeter {2 * (w + h)}")


# Linear equations are the exact-answer template of tasks.py; they come as task documents only (never inside
# these multi-problem documents), so the held-out equations can be kept out of training exactly.
MATH_PROBLEMS = [_m_word, _m_mult, _m_frac, _m_quad, _m_system, _m_percent, _m_order, _m_sequence, _m_area]


def gen_math(rng: random.Random) -> str:
    style = rng.randrange(3)
    parts = []
    for i in range(rng.randint(2, 5)):
        q, s = _pick(rng, MATH_PROBLEMS)(rng)
        if style == 0:
            parts.append(f"Problem {i + 1}. {q}\nSolution.\n{s}")
        elif style == 1:
            parts.append(f"Q: {q}\nA: Let's work it out step by step.\n{s}")
        else:
            parts.append(f"Exercise {i + 1}: {q}\n{s}")
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# code: Python source with generated identifiers and structures
CW = ["user", "item", "order", "record", "value", "count", "total", "index", "node", "path", "name", "price", "score",
      "buffer", "token", "config", "cache", "queue", "result", "entry", "key", "data", "line", "size", "limit", "event",
      "matrix", "row", "column", "message", "packet", "task", "job", "batch", "weight", "state", "session", "file"]
CV = ["get", "set", "load", "save", "parse", "build", "compute", "update", "find", "check", "merge", "split", "format",
      "validate", "reset", "process", "collect", "filter", "normalize", "render", "read", "write", "apply", "sort"]
CLS = ["Parser", "Cache", "Queue", "Registry", "Buffer", "Matrix", "Graph", "Tokenizer", "Scheduler", "Counter",
       "Inventory", "Session", "Logger", "Router", "Store", "Encoder", "Reader", "Builder", "Tracker", "Pool"]


def _ident(rng, n=2):
    return "_".join(_pick(rng, CW) for _ in range(n))


def _expr(rng, vs):
    a = _pick(rng, vs)
    forms = [f"{a} + {rng.randint(1, 9)}", f"{a} * {_pick(rng, vs)}", f"len({a})", f"{a} // {rng.randint(2, 8)}",
             f"max({a}, {_pick(rng, vs)})", f"{a}[{rng.randint(0, 3)}]", f"{a}.get('{_pick(rng, CW)}')",
             f"str({a}).strip()", f"{a} - {_pick(rng, vs)}", f"abs({a})", f"sum({a})", f"sorted({a})",
             f"{a} % {rng.randint(2, 16)}", f"int({a})", f"[x for x in {a} if x]", f"{a} or {rng.randint(0, 5)}"]
    return _pick(rng, forms)


def _block(rng, vs, depth, ind):
    out = []
    for _ in range(rng.randint(2, 5)):
        kind = rng.randrange(8 if depth < 2 else 4)
        pad = "    " * ind
        if kind <= 2:
            v = _pick(rng, CW) if rng.random() < 0.5 else _ident(rng)
            out.append(f"{pad}{v} = {_expr(rng, vs)}")
            vs = vs + [v]
        elif kind == 3:
            out.append(f"{pad}{_pick(rng, vs)}.append({_expr(rng, vs)})")
        elif kind == 4:
            it = _pick(rng, CW)
            out.append(f"{pad}for {it} in {_pick(rng, vs)}:")
            out += _block(rng, vs + [it], depth + 1, ind + 1)
        elif kind == 5:
            out.append(f"{pad}if {_pick(rng, vs)} {_pick(rng, ['>', '<', '==', '!=', '>=', 'is', 'in'])} {_expr(rng, vs)}:")
            out += _block(rng, vs, depth + 1, ind + 1)
            if rng.random() < 0.4:
                out.append(f"{pad}else:")
                out += _block(rng, vs, depth + 1, ind + 1)
        elif kind == 6:
            out.append(f"{pad}try:")
            out += _block(rng, vs, depth + 1, ind + 1)
            out.append(f"{pad}except {_pick(rng, ['KeyError', 'ValueError', 'IndexError', 'OSError', 'TypeError'])}:")
            out.append(f"{pad}    {_pick(rng, ['pass', 'continue' if depth else 'pass', 'return None', 'raise'])}")
        else:
            out.append(f"{pad}while {_pick(rng, vs)} and {_pick(rng, vs)} < {rng.randint(2, 100)}:")
            out += _block(rng, vs, depth + 1, ind + 1)
            out.append(f"{pad}    break")
    return out


def _function(rng, ind=0, method=False):
    name = f"{_pick(rng, CV)}_{_ident(rng, rng.randint(1, 2))}"
    args = list(dict.fromkeys(_pick(rng, CW) for _ in range(rng.randint(1, 3))))
    sig = (["self"] if method else []) + args
    if rng.random() < 0.4:
        sig = [f"{a}: {_pick(rng, ['int', 'str', 'list', 'dict', 'float'])}" if a != "self" else a for a in sig]
    pad = "    " * ind
    lines = [f"{pad}def {name}({', '.join(sig)}):"]
    if rng.random() < 0.6:
        lines.append(f'{pad}    """{_pick(rng, CV).capitalize()} the {_pick(rng, CW)} {_pick(rng, ["from", "for", "of", "into"])} the given {args[0]}."""')
    vs = args + (["self"] if method else [])
    lines += _block(rng, vs, 0, ind + 1)
    lines.append(f"{pad}    return {_expr(rng, vs)}")
    return lines


def _klass(rng):
    name = _pick(rng, CLS) if rng.random() < 0.5 else _pick(rng, CW).capitalize() + _pick(rng, CLS)
    base = _pick(rng, ["", "(object)", "(Exception)", "(dict)", ""])
    lines = [f"class {name}{base}:", f'    """A {_pick(rng, ADJ)} {name.lower()} that keeps {_pick(rng, CW)}s."""', ""]
    fields = list(dict.fromkeys(_pick(rng, CW) for _ in range(rng.randint(1, 4))))
    lines.append(f"    def __init__(self, {', '.join(fields)}):")
    lines += [f"        self.{f} = {f}" for f in fields]
    for _ in range(rng.randint(1, 3)):
        lines.append("")
        lines += _function(rng, 1, method=True)
    return lines


def gen_code(rng: random.Random) -> str:
    imports = sorted(set(rng.sample(["os", "sys", "json", "re", "math", "time", "random", "itertools", "collections",
                                     "functools", "pathlib", "typing", "dataclasses", "logging"], rng.randint(1, 4))))
    lines = [f"import {m}" for m in imports]
    if rng.random() < 0.5:
        lines.insert(0, f'"""{_pick(rng, CV).capitalize()} and {_pick(rng, CV)} {_pick(rng, CW)} {_pick(rng, ["records", "files", "values", "items"])}."""\n')
    if rng.random() < 0.4:
        lines.append(f"\n{_pick(rng, CW).upper()}_{_pick(rng, CW).upper()} = {rng.randint(1, 4096)}")
    for _ in range(rng.randint(1, 3)):
        lines.append("\n")
        lines += _klass(rng) if rng.random() < 0.4 else _function(rng)
    if rng.random() < 0.3:
        lines += ["\n", 'if __name__ == "__main__":', f"    {_pick(rng, CV)}_{_pick(rng, CW)}(sys.argv[1:])"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# prose: English narrative and descriptive paragraphs
def _np(rng, det=True):
    a = _pick(rng, ADJ) + " " if rng.random() < 0.6 else ""
    return f"{_pick(rng, ['the', 'a', 'an old', 'every', 'that', 'one']) if det else 'the'} {a}{_pick(rng, NOUN)}"


def _sentence(rng, who):
    t = rng.randrange(9)
    if t == 0:
        s = f"{who} {_pick(rng, VERB_T)} {_np(rng)} near {_pick(rng, PLACES)}."
    elif t == 1:
        s = f"{_np(rng).capitalize()} {_pick(rng, VERB_I)} {_pick(rng, ADV)} while {who} {_pick(rng, VERB_T)} {_np(rng)}."
    elif t == 2:
        s = f"{_pick(rng, CONN)} {who} {_pick(rng, VERB_I)} {_pick(rng, ['by', 'beside', 'under', 'beyond'])} {_np(rng)}."
    elif t == 3:
        s = f"It was {_pick(rng, ['a', 'an unusually', 'a very', 'a rather'])} {_pick(rng, ADJ)} {_pick(rng, ['day', 'night', 'season', 'year', 'hour'])}, and {_np(rng)} seemed {_pick(rng, ADJ)}."
    elif t == 4:
        s = f"\"{_pick(rng, ['Perhaps', 'Surely', 'I think', 'Maybe', 'Listen,'])} {_np(rng)} will {_pick(rng, ['return', 'wait', 'change', 'matter', 'stay'])},\" {who} said {_pick(rng, ADV)}."
    elif t == 5:
        s = f"{_pick(rng, ['Nobody', 'Few people', 'Everyone', 'The neighbours', 'Her brother', 'His mother'])} knew why {_np(rng)} had {_pick(rng, VERB_T)} {_np(rng)}."
    elif t == 6:
        s = f"In {_pick(rng, PLACES)}, {_np(rng)} {_pick(rng, VERB_I)} and {_np(rng)} {_pick(rng, VERB_T)} {_np(rng)}."
    elif t == 7:
        s = f"{who} thought about {_np(rng)} and about the {_pick(rng, ADJ)} {_pick(rng, NOUN)} of {_pick(rng, PLACES)}."
    else:
        s = f"The {_pick(rng, NOUN)} was {_pick(rng, ADJ)}, {_pick(rng, ADJ)} and {_pick(rng, ['full of', 'far from', 'close to', 'quiet like'])} {_np(rng)}."
    return s[0].upper() + s[1:]


ESSAY_TOPICS = ["rivers", "old cities", "libraries", "winter", "trade routes", "village festivals", "lighthouses",
                "gardens", "railways", "mountain farms", "markets", "letters", "bridges", "islands", "music"]


def gen_prose(rng: random.Random) -> str:
    who = _pick(rng, NAMES)
    paras = []
    if rng.random() < 0.35:  # expository essay style
        topic = _pick(rng, ESSAY_TOPICS)
        paras.append(f"On {topic}")
        for _ in range(rng.randint(2, 4)):
            sents = [f"{_pick(rng, ['Many people believe that', 'It is often said that', 'Historians note that', 'In most regions,', 'Over the centuries,'])} {topic} {_pick(rng, ['shaped', 'changed', 'reflected', 'connected'])} {_np(rng)}."]
            sents += [_sentence(rng, _pick(rng, ["the traveler", "the writer", "the farmer", "one visitor", who]))
                      for _ in range(rng.randint(3, 6))]
            paras.append(" ".join(sents))
    else:
        for _ in range(rng.randint(2, 5)):
            paras.append(" ".join(_sentence(rng, who if rng.random() < 0.7 else _pick(rng, NAMES))
                                  for _ in range(rng.randint(3, 7))))
    return "\n\n".join(paras)


# ---------------------------------------------------------------------------------------------------------
# chat: user/assistant dialogues
CHAT_TOPICS = {
    "cooking": (["How long should I boil an egg?", "Can I replace butter with oil in a cake?", "What goes well with roasted carrots?",
                 "My soup is too salty. What can I do?", "How do I keep rice from getting sticky?"],
                ["For a soft yolk, about six minutes is enough; for a firm one, try ten.", "Yes, you can usually use a little less oil than butter.",
                 "Honey, thyme and a squeeze of lemon work very well.", "Add a peeled potato or a splash of water and taste again.",
                 "Rinse the rice first and let it rest with the lid on after cooking."]),
    "travel": (["What should I pack for a week in the mountains?", "Is it better to take the train or the bus?",
                "How early should I arrive at the station?", "Any tips for a long flight?", "What is a good way to learn a few words before a trip?"],
               ["Bring layers, a rain jacket, good boots and a small first aid kit.", "The train is usually more comfortable, while the bus is often cheaper.",
                "Twenty minutes is plenty for most trains, a bit more if you need tickets.", "Drink water, walk around now and then, and bring something warm.",
                "Learn greetings, numbers and polite phrases first; they help the most."]),
    "study": (["I keep forgetting what I read. Any advice?", "How do I prepare for an exam in two weeks?",
               "Is it okay to study with music?", "How can I focus better in the morning?", "What is a good way to take notes?"],
              ["Try to explain each section in your own words right after reading it.", "Make a short plan, review a little every day, and test yourself often.",
               "Quiet music without lyrics helps some people, so try it and see.", "Start with one small task and keep your phone in another room.",
               "Write short summaries and questions in the margin instead of copying sentences."]),
    "daily": (["Hi! How are you today?", "Can you help me write a short thank you note?", "What should I do on a rainy weekend?",
               "My plant has yellow leaves. Why?", "How do I start running if I have never done it?"],
              ["I'm doing well, thanks for asking. How can I help you?", "Of course. Who is the note for, and what would you like to thank them for?",
               "You could read a good book, try a new recipe, or visit a museum.", "It often means too much water; let the soil dry a little between waterings.",
               "Begin with short walks mixed with one minute of easy running, three times a week."]),
}
FOLLOW_USER = ["Thanks, that helps!", "Could you explain that a bit more?", "What if that does not work?", "Great, anything else I should know?",
               "Okay, and how often should I do that?", "That makes sense.", "Why is that?", "Can you give me an example?"]
FOLLOW_ASSIST = ["You're welcome! Let me know if you have more questions.", "Sure. The main idea is to go step by step and notice what changes.",
                 "Then try a smaller change first and see how it goes.", "Keep it simple and be patient with yourself.",
                 "A few times a week is a good start.", "Glad it helps.", "Mostly because small habits add up over time.",
                 "For example, you could start this evening with just ten minutes."]


def gen_chat(rng: random.Random) -> str:
    topic = _pick(rng, list(CHAT_TOPICS))
    qs, ans = CHAT_TOPICS[topic]
    style = rng.randrange(3)
    u, a = [("User", "Assistant"), ("Human", "AI"), ("<user>", "<assistant>")][style]
    sep = ": " if style < 2 else " "
    lines = []
    if rng.random() < 0.3:
        lines.append(f"System{sep}You are a {_pick(rng, ['helpful', 'friendly', 'patient', 'concise'])} assistant.")
    i = rng.randrange(len(qs))
    name = _pick(rng, NAMES)
    greet = rng.random() < 0.3
    lines.append(f"{u}{sep}{'Hello, I am ' + name + '. ' if greet else ''}{qs[i]}")
    lines.append(f"{a}{sep}{'Nice to meet you, ' + name + '! ' if greet else ''}{ans[i]}")
    for _ in range(rng.randint(1, 4)):
        j = rng.randrange(len(FOLLOW_USER))
        if rng.random() < 0.35:
            k = rng.randrange(len(qs))
            lines.append(f"{u}{sep}{qs[k]}")
            lines.append(f"{a}{sep}{ans[k]}")
        else:
            lines.append(f"{u}{sep}{FOLLOW_USER[j]}")
            lines.append(f"{a}{sep}{FOLLOW_ASSIST[j]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# records: JSON lines, CSV tables, log lines, key=value
SERVICES = ["auth", "billing", "search", "gateway", "worker", "scheduler", "storage", "mailer", "cache", "api"]
LEVELS = ["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"]
LOGMSG = ["request completed", "connection opened", "connection closed", "retrying after timeout", "cache miss",
          "user logged in", "job finished", "disk usage high", "invalid token", "rate limit exceeded", "config reloaded"]
CITIES = ["Berlin", "Lisbon", "Osaka", "Toronto", "Nairobi", "Lima", "Oslo", "Seoul", "Austin", "Perth", "Quito"]


def _ts(rng):
    return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"


def gen_records(rng: random.Random) -> str:
    kind = rng.randrange(4)
    n = rng.randint(4, 12)
    if kind == 0:
        rows = []
        for _ in range(n):
            rows.append(json.dumps({"id": rng.randint(1000, 99999), "name": _pick(rng, NAMES), "city": _pick(rng, CITIES),
                                    "age": rng.randint(18, 80), "active": rng.random() < 0.7,
                                    "score": round(rng.uniform(0, 100), 2), "tags": rng.sample(CW, rng.randint(0, 3))}))
        return "\n".join(rows)
    if kind == 1:
        cols = rng.sample(["id", "date", "product", "quantity", "price", "region", "status", "customer"], rng.randint(4, 6))
        out = [",".join(cols)]
        gens = {"id": lambda: str(rng.randint(1, 9999)), "date": lambda: _ts(rng)[:10], "product": lambda: _pick(rng, ITEMS),
                "quantity": lambda: str(rng.randint(1, 50)), "price": lambda: f"{rng.uniform(1, 500):.2f}",
                "region": lambda: _pick(rng, CITIES), "status": lambda: _pick(rng, ["paid", "open", "shipped", "refunded"]),
                "customer": lambda: _pick(rng, NAMES)}
        out += [",".join(gens[c]() for c in cols) for _ in range(n)]
        return "\n".join(out)
    if kind == 2:
        return "\n".join(f"{_ts(rng)} {_pick(rng, LEVELS)} [{_pick(rng, SERVICES)}] {_pick(rng, LOGMSG)} "
                         f"id={rng.randint(1, 99999)} latency_ms={rng.randint(1, 2500)}" for _ in range(n))
    return "\n".join(f"ts={_ts(rng)} host=node{rng.randint(1, 40)} svc={_pick(rng, SERVICES)} status={rng.choice([200, 200, 201, 404, 500, 503])} "
                     f"bytes={rng.randint(100, 90000)} user={_pick(rng, NAMES).lower()}" for _ in range(n))


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "math": gen_math, "code": gen_code, "prose": gen_prose, "chat": gen_chat, "records": gen_records,
}
DOMAINS = tuple(GENERATORS)
DOMAIN_SEED = {"math": 101, "code": 202, "prose": 303, "chat": 404, "records": 505}


def generate(domain: str, n: int, split: str, style: str = "short") -> list[str]:
    """`n` documents of `domain` for `split` ("train", "heldout" or "calib"); splits use disjoint seeds; `style`:
    the equations' working in task documents (tasks.py `equation`).

    Calibration and held-out `math` and `code` documents alternate with groups of exact-answer task documents
    (tasks.py), so pools are discovered on, and perplexity is measured over, both kinds of text the domain holds.
    Training adds its task documents separately (train/data.py), in larger numbers.
    """
    from .tasks import TASK_DOMAIN, task_document

    offset = {"train": 0, "heldout": 7_000_000, "calib": 9_000_000}[split]
    rng = random.Random(DOMAIN_SEED[domain] * 1_000_003 + offset)
    gen = GENERATORS[domain]
    families = [f for f, d in TASK_DOMAIN.items() if d == domain] if split != "train" else []
    out = []
    for i in range(n):
        if families and i % 2 == 1:
            out.append("\n\n".join(task_document(families[j % len(families)], rng, style)[1] for j in range(6)))
        else:
            out.append(gen(rng))
    return out
