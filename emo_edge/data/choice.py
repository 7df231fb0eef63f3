"""Multiple-choice held-out sets for the free-text domains (scored by log-likelihood, `emo-edge eval --tasks
prose,chat`), made from the generators with seeds disjoint from training:

- chat: `User: {question}` then `Assistant:`; the choices are the chat domain's answer to that question and three
  answers to other questions of the bank (does the model answer the question asked?);
- prose: an essay's title and first paragraph; the choices are the opening sentence of its second paragraph (which
  names the topic again) and those of three essays on other topics (does the model keep to the topic?).
Four choices: chance is 25%.
"""

from __future__ import annotations

import random

from .generators import CHAT_TOPICS, gen_prose

CHOICE_FAMILIES = ("chat", "prose")
N_CHOICES = 4


def _chat_items(rng: random.Random, n: int) -> list[dict]:
    bank = [(q, a) for qs, ans in CHAT_TOPICS.values() for q, a in zip(qs, ans)]
    answers = sorted({a for _, a in bank})
    out = []
    for _ in range(n):
        q, a = rng.choice(bank)
        wrong = rng.sample([x for x in answers if x != a], N_CHOICES - 1)
        choices = [a] + wrong
        rng.shuffle(choices)
        out.append({"prompt": f"User: {q}\nAssistant:", "choices": [" " + c for c in choices],
                    "label": choices.index(a)})
    return out


def _essay(rng: random.Random) -> tuple[str, str, str] | None:
    """(title line, first paragraph, first sentence of the second paragraph: it names the topic again) of a
    generated essay, or None for a narrative."""
    text = gen_prose(rng)
    if not text.startswith("On "):
        return None
    paras = text.split("\n\n")
    if len(paras) < 3:
        return None
    return paras[0], paras[1], paras[2].split(". ")[0].rstrip(".") + "."


def _prose_items(rng: random.Random, n: int) -> list[dict]:
    essays = []
    while len(essays) < 4 * n:
        e = _essay(rng)
        if e is not None:
            essays.append(e)
    out = []
    for i in range(n):
        title, first, nxt = essays[i]
        others = [e for e in essays[n:] if e[0] != title]
        wrong = [e[2] for e in rng.sample(others, N_CHOICES - 1)]
        choices = [nxt] + wrong
        rng.shuffle(choices)
        out.append({"prompt": f"{title}\n\n{first}\n\n", "choices": choices,
                    "label": choices.index(nxt)})
    return out


def heldout_choice(family: str, n: int) -> list[dict]:
    rng = random.Random(770_000 + CHOICE_FAMILIES.index(family))
    return _chat_items(rng, n) if family == "chat" else _prose_items(rng, n)
