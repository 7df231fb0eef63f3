"""One completion request, from its validated body to the events the HTTP layer sends: the pool it asks for, the
prompt ids, the checks against the context, and a `Job` whose worker-thread callbacks feed an asyncio queue.

Events on `Pending.events`: ("start", {"pool", "swapped", "swap_ms"}), ("text", str) ..., then ("done", (Completion,
hit_stop_string)) or ("error", exception)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..model.tokenizer import CHAT, TextStream
from ..engine import Engine, Sampling
from .openai_schema import ApiError, ChatRequest, Common
from .scheduler import Job

CHAT_DEFAULT_TOKENS = 256  # max_tokens when a chat request gives none (bounded by the room left in the context)


def requested_pool(req: Common, engine: Engine) -> str | None:
    """The pool a request names (`pool` field, else model "BUNDLE:POOL"), None = auto; unknown ones refused."""
    model, _, from_model = req.model.partition(":")
    known = ", ".join(engine.pools)
    if model != engine.name:
        raise ApiError(f"model '{req.model}' does not exist; this server has '{engine.name}' and "
                       f"'{engine.name}:POOL' (POOL one of {known})", status=404, param="model",
                       code="model_not_found")
    if req.pool is not None and from_model and req.pool != from_model:
        raise ApiError(f"pool '{req.pool}' and model '{req.model}' name different pools", param="pool")
    pool, param = (req.pool, "pool") if req.pool is not None else (from_model or None, "model")
    if pool in (None, "auto"):
        return None
    if pool not in engine.pools:
        raise ApiError(f"unknown pool '{pool}'; the bundle's pools: {known} (or auto)", param=param,
                       code="unknown_pool")
    return pool


def chat_prompt(req: ChatRequest) -> tuple[str, str]:
    """(prompt text in the model's chat format, the last user message: what auto chooses the pool from)."""
    system = "\n".join(m.text() for m in req.messages if m.role in ("system", "developer")) or None
    turns: list[list] = []
    for m in req.messages:
        if m.role == "user":
            if turns and turns[-1][1] is None:
                turns[-1][0] += "\n" + m.text()
            else:
                turns.append([m.text(), None])
        elif m.role == "assistant":
            if not turns or turns[-1][1] is not None:
                turns.append(["", m.text()])
            else:
                turns[-1][1] = m.text()
    if not turns or turns[-1][1] is not None:
        raise ApiError("messages: the last message must be from the user (role 'user')", param="messages")
    return CHAT.render([tuple(t) for t in turns], system), turns[-1][0]


def sampling(req: Common, n_prompt: int, limit: int, default: int | None) -> Sampling:
    """Checks max_tokens and the prompt against the context (`limit` tokens: prompt + answer)."""
    where = "messages" if isinstance(req, ChatRequest) else "prompt"
    if n_prompt == 0:
        raise ApiError("the prompt is empty: nothing to complete", param=where)
    if n_prompt >= limit:
        raise ApiError(f"the prompt is {n_prompt} tokens; this model's context holds {limit} tokens, prompt and "
                       f"answer together: shorten it", param=where, code="context_length_exceeded")
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is not None and asked >= limit:
        raise ApiError(f"max_tokens {asked}: must be below the context ({limit} tokens)", param="max_tokens")
    room = limit - n_prompt
    if asked is None:
        asked = min(default or CHAT_DEFAULT_TOKENS, room)
    return Sampling(max_tokens=asked, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                    ignore_eos=bool((req.model_extra or {}).get("ignore_eos") is True))


@dataclass
class Pending:
    """A submitted job and the queue its events arrive on."""

    job: Job
    events: asyncio.Queue
    prompt_tokens: int


def make_job(engine: Engine, req: Common, chat: bool) -> Pending:
    """Validate `req` against `engine` and build its job (not yet submitted)."""
    pool = requested_pool(req, engine)
    if chat:
        text, last_user = chat_prompt(req)
        ids, choose_on = engine.encode(text), engine.encode(last_user) or None
        stops = req.stops() + CHAT.stop
    else:
        ids = engine.encode(req.text())
        choose_on, stops = None, req.stops()
    samp = sampling(req, len(ids), engine.token_limit, None if chat else req.max_tokens)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def put(kind: str, value) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    started = [not chat]  # a chat answer follows "Assistant:"; the format's space before it is not the answer's

    def write(s: str) -> None:
        if not started[0]:
            s = s.lstrip()
            started[0] = bool(s)
        if s:
            put("text", s)

    stream = TextStream(engine.tokenizer, write, stop=stops)

    def done(gen) -> None:
        stream.finish()
        put("done", (gen, stream.stopped))

    job = Job(ids=ids, pool=pool, sampling=samp, choose_on=choose_on,
              on_start=lambda p, sw, ms: put("start", {"pool": p, "swapped": sw, "swap_ms": round(ms, 3)}),
              on_token=stream.push, on_done=done, on_error=lambda exc: put("error", exc))
    return Pending(job, events, len(ids))
