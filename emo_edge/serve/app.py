"""The ASGI layer (Starlette): OpenAI-compatible endpoints over the scheduler, /health, /metrics and the chat page.

The model loads on a background thread started at startup, so /health answers 503 until it is ready (and says
why if loading failed; `on_load_error` lets the command stop the server then). Every refusal is the OpenAI
error shape {"error": {"message", "type", "param", "code"}} with a 4xx status."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import EmoEdgeError
from ..engine import Engine
from .generation import Pending, make_job
from .guard import BodyTooLarge, ClientGone, Guard, allowed_hosts
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .openai_schema import MAX_BODY, ApiError, ChatRequest, CompletionRequest, finish_reason, new_id, now, parse_body, usage
from .scheduler import QueueFull, Scheduler

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("static") / "index.html"
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client went away


class ServerState:
    """What the handlers share: the engine and scheduler once loaded, or the loading error."""

    def __init__(self, load: Callable[[], Engine], api_key: str | None, k: int, grouping: bool,
                 budget: int | None, on_load_error: Callable[[BaseException], None] | None = None,
                 on_ready: Callable[[Engine], None] | None = None):
        self.load, self.api_key, self.k, self.grouping = load, api_key, k, grouping
        self.on_load_error, self.on_ready = on_load_error, on_ready
        self.metrics = Metrics(budget)
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.error: BaseException | None = None

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="emo-edge-load", daemon=True).start()

    def _load(self) -> None:
        try:
            engine = self.load()
            self.metrics.snapshot(engine)
            self.scheduler = Scheduler(engine, k=self.k, grouping=self.grouping, observer=self.metrics)
            self.engine = engine
            if self.on_ready:
                self.on_ready(engine)
        except BaseException as exc:  # noqa: BLE001 - reported by /health and the command
            self.error = exc
            if not isinstance(exc, EmoEdgeError):
                log.exception("loading failed")
            if self.on_load_error:
                self.on_load_error(exc)

    def ready(self) -> tuple[Engine, Scheduler]:
        if self.engine is None or self.scheduler is None:
            why = f"loading failed: {self.error}" if self.error else "the model is still loading; retry shortly"
            raise ApiError(why, status=503, type="server_error", code="loading")
        return self.engine, self.scheduler

    def close(self) -> None:
        if self.scheduler:
            self.scheduler.close()
        if self.engine:
            self.engine.close()


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def endpoint(name: str, auth: bool = True):
    """Handler wrapper: bearer-token check; ApiError -> its JSON, another user error -> 400, a bug -> 500 (all in
    the OpenAI error shape); counts requests by endpoint and status."""
    def wrap(fn):
        async def handler(request: Request) -> Response:
            state: ServerState = request.app.state.serve
            try:
                if auth and state.api_key is not None:
                    _check_key(request, state.api_key)
                resp = await fn(request, state)
            except ApiError as exc:
                resp = _error(exc)
            except BodyTooLarge:  # a chunked body passed the limit while it was read (guard.py)
                resp = _error(ApiError(f"request body is over {MAX_BODY} bytes", status=413, code="body_too_large"))
            except ClientGone:  # the client went away before its body was read: nothing to answer, no error
                resp = Response(status_code=499)
            except EmoEdgeError as exc:
                resp = _error(ApiError(str(exc)))
            except Exception as exc:  # noqa: BLE001 - a bug of ours: still the OpenAI shape, and keep serving
                log.exception("%s failed", name)
                resp = _error(ApiError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                       type="server_error"))
            state.metrics.requests.labels(name, str(resp.status_code)).inc()
            return resp
        return handler
    return wrap


def _check_key(request: Request, key: str) -> None:
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError("missing or wrong API key: send 'Authorization: Bearer KEY' (the server's --api-key)",
                       status=401, code="invalid_api_key")


@endpoint("health", auth=False)
async def health(request: Request, state: ServerState) -> Response:
    if state.engine is None:
        body = {"status": "error", "message": str(state.error)} if state.error else {"status": "loading"}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok", "model": state.engine.name, "pools": state.engine.pools,
                         "memory": getattr(state.engine, "memory", None)})


@endpoint("models")
async def models(request: Request, state: ServerState) -> Response:
    engine, _ = state.ready()
    ids = [engine.name] + [f"{engine.name}:{p}" for p in engine.pools]
    return JSONResponse({"object": "list", "data": [{"id": i, "object": "model", "created": 0,
                                                     "owned_by": "emo-edge"} for i in ids]})


@endpoint("metrics")
async def metrics(request: Request, state: ServerState) -> Response:
    depth = state.scheduler.waiting() if state.scheduler else 0
    return Response(state.metrics.render(depth), media_type=CONTENT_TYPE_LATEST)


async def page(request: Request) -> Response:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@endpoint("chat.completions")
async def chat_completions(request: Request, state: ServerState) -> Response:
    return await _complete(request, state, chat=True)


@endpoint("completions")
async def completions(request: Request, state: ServerState) -> Response:
    return await _complete(request, state, chat=False)


async def _complete(request: Request, state: ServerState, chat: bool) -> Response:
    req = parse_body(await request.body(), ChatRequest if chat else CompletionRequest)
    engine, scheduler = state.ready()
    pending = make_job(engine, req, chat)
    try:
        scheduler.submit(pending.job)
    except QueueFull as exc:
        raise ApiError(str(exc), status=503, type="server_error", code="busy") from None
    shape = _Shape(chat, req.model, new_id("chatcmpl" if chat else "cmpl"))
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        return _EventStream(_sse(pending, shape, include), on_close=pending.job.cancelled.set)
    return await _collect(request, pending, shape)


class _Shape:
    """The OpenAI object shapes of one response (chat or text completion, whole or chunk)."""

    def __init__(self, chat: bool, model: str, rid: str):
        self.chat, self.model, self.id, self.created = chat, model, rid, now()

    def obj(self, choices: list, extra: dict, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def choice(self, text: str, finish: str | None, chunk: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if chunk:
            delta = ({"role": "assistant", "content": text} if first else {"content": text}) if finish is None \
                else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}


def _raise(exc: BaseException) -> None:
    if isinstance(exc, ApiError):
        raise exc
    if isinstance(exc, EmoEdgeError):
        raise ApiError(str(exc), status=400 if "cancelled" not in str(exc) else 499) from None
    raise ApiError(f"generation failed: {type(exc).__name__}: {exc}", status=500, type="server_error") from None


async def _collect(request: Request, pending: Pending, shape: _Shape) -> Response:
    """Wait for the whole answer (cancelling it if the client goes away)."""
    info, parts = {}, []
    while True:
        try:
            kind, value = await asyncio.wait_for(pending.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                pending.job.cancelled.set()
            continue
        if kind == "start":
            info = value
        elif kind == "text":
            parts.append(value)
        elif kind == "error":
            _raise(value)
        else:
            gen, hit = value
            body = shape.obj([shape.choice("".join(parts), finish_reason(gen.stop, hit), chunk=False)],
                             {"usage": usage(pending.prompt_tokens, len(gen.ids), gen.cached_tokens), "emo_edge": info}, chunk=False)
            return JSONResponse(body)


async def _sse(pending: Pending, shape: _Shape, include_usage: bool):
    """Server-sent events: `data: {chunk}` per piece of text, the finishing chunk, the usage chunk if asked,
    `data: [DONE]`. An error after the stream started is sent as one `data: {"error": ...}` event."""
    def event(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    info, first = {}, True
    while True:
        kind, value = await pending.events.get()
        if kind == "start":
            info = value
        elif kind == "text":
            yield event(shape.obj([shape.choice(value, None, chunk=True, first=first)], {"emo_edge": info}, True))
            first = False
        elif kind == "error":
            try:
                _raise(value)
            except ApiError as exc:
                yield event(exc.body())
            break
        else:
            gen, hit = value
            extra = {"emo_edge": info}
            if first and shape.chat:  # no text at all: still announce the role
                yield event(shape.obj([shape.choice("", None, chunk=True, first=True)], extra, True))
            yield event(shape.obj([shape.choice("", finish_reason(gen.stop, hit), chunk=True)], extra, True))
            if include_usage:
                yield event(shape.obj([], {"usage": usage(pending.prompt_tokens, len(gen.ids), gen.cached_tokens), **extra}, True))
            break
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """text/event-stream whose `on_close` runs however the response ends (a client gone mid-stream included:
    then it cancels the generation)."""

    def __init__(self, body, on_close: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def create_app(state: ServerState, host: str = "127.0.0.1", allow_hosts=(), allow_origins=()) -> Guard:
    """The server's ASGI app: the Starlette routes behind the request guard (guard.py)."""
    app = _routes(state)
    return Guard(app, allowed_hosts(host, allow_hosts), allow_origins,
                 on_refused=lambda reason, status: state.metrics.requests.labels(f"refused:{reason}",
                                                                                  str(status)).inc())


def _routes(state: ServerState) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.start_loading()
        yield
        await asyncio.to_thread(state.close)

    async def http_error(request: Request, exc: HTTPException) -> Response:  # unknown path, wrong method
        return _error(ApiError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code))

    app = Starlette(exception_handlers={HTTPException: http_error}, routes=[
        Route("/", page), Route("/health", health), Route("/metrics", metrics),
        Route("/v1/models", models), Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ], lifespan=lifespan)
    app.state.serve = state
    return app
