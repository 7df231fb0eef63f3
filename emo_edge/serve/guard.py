"""What every HTTP request passes before a handler sees it (a pure ASGI middleware, so nothing is read first):

- **Host**: only names of the listening address, localhost and its loopback addresses, and `--allow-host` values
  are accepted (`*`: any); anything else is 421, which defeats DNS rebinding (a page on attacker.example whose
  name resolves to 127.0.0.1 sends `Host: attacker.example`).
- **Origin** (CORS): a request that carries an `Origin` other than the server's own and the `--allow-origin`
  values is 403; allowed cross-origin requests get the CORS headers, and their preflight (OPTIONS) is answered.
- **POST bodies must be `application/json`**: a `text/plain` or form POST, which a browser sends cross-site
  without a preflight, is 415.
- **Body size**: a declared `Content-Length` over the limit is 413 before a byte is read; a chunked body is
  stopped (413) when it passes the limit; the bytes of all bodies being received are bounded
  (`max_inflight`), past which a request is 503 with `Retry-After`. A client that goes away before its body is
  read ends quietly (counted as `client_closed` in the request metric, not as an error).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Callable, Iterable

from .openai_schema import MAX_BODY

MAX_INFLIGHT = 8 << 20  # bodies of all requests being received at once
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


def _host_name(value: str) -> str:
    """The host part of a Host header (no port, no IPv6 brackets), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def allowed_hosts(listen_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names accepted; None when any is (`--allow-host '*'`)."""
    extra = [h.strip().lower() for h in extra if h.strip()]
    if "*" in extra:
        return None
    names = {_host_name(listen_host), *LOOPBACK_NAMES, *(_host_name(h) for h in extra)}
    try:
        if ipaddress.ip_address(_host_name(listen_host)).is_loopback:
            names.add("127.0.0.1")
    except ValueError:
        pass
    return frozenset(names)


def _json_error(status: int, message: str, code: str, headers: list | None = None):
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return status, head + (headers or []), body


class Guard:
    def __init__(self, app, hosts: frozenset[str] | None, origins: Iterable[str] = (), max_body: int = MAX_BODY,
                 max_inflight: int = MAX_INFLIGHT, on_refused: Callable[[str, int], None] | None = None):
        self.app, self.hosts = app, hosts
        self.origins = frozenset(o.rstrip("/").lower() for o in origins)
        self.max_body, self.max_inflight = max_body, max_inflight
        self.inflight = 0
        self.on_refused = on_refused

    async def _send(self, send, status, headers, body, reason: str) -> None:
        if self.on_refused:
            self.on_refused(reason, status)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _cors(self, origin: str | None, own: str) -> list | None:
        """CORS headers for an allowed cross-origin request, [] for a same-origin or origin-less one, None for
        an origin that is refused."""
        if origin is None or origin == own:
            return []
        if origin in self.origins or "*" in self.origins:
            return [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin"),
                    (b"access-control-allow-headers", b"authorization, content-type"),
                    (b"access-control-allow-methods", b"GET, POST, OPTIONS")]
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.hosts is not None and _host_name(host) not in self.hosts:
            return await self._send(send, *_json_error(
                421, f"Host {host[:80]!r} is not this server's name (start it with --allow-host NAME to accept "
                     f"it)", "host_not_allowed"), "host")
        origin = headers.get("origin")
        origin = origin.rstrip("/").lower() if origin is not None else None
        cors = self._cors(origin, f"http://{host.lower()}")
        if cors is None:
            return await self._send(send, *_json_error(
                403, f"Origin {origin[:80]!r} is not allowed (start the server with --allow-origin ORIGIN)",
                "origin_not_allowed"), "origin")
        method = scope["method"]
        if method == "OPTIONS" and cors:
            return await self._send(send, 204, cors + [(b"content-length", b"0")], b"", "preflight")
        if method == "POST":
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return await self._send(send, *_json_error(
                    415, f"POST bodies must be 'Content-Type: application/json' (got {ctype[:60] or 'none'!r})",
                    "unsupported_media_type"), "content_type")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await self._send(send, *_json_error(400, "Content-Length is not a number",
                                                           "bad_content_length"), "length")
            if int(declared) > self.max_body:
                return await self._send(send, *_json_error(
                    413, f"request body is {int(declared)} bytes; at most {self.max_body}", "body_too_large"),
                    "too_large")
        reserve = int(declared) if declared is not None else self.max_body
        if method in ("POST", "PUT", "PATCH") and self.inflight + reserve > self.max_inflight:
            return await self._send(send, *_json_error(
                503, "too many request bodies being received; retry shortly", "busy",
                [(b"retry-after", b"1")]), "inflight")
        counted = reserve if method in ("POST", "PUT", "PATCH") else 0
        self.inflight += counted
        received = 0
        started = body_done = False

        async def limited_receive():
            nonlocal received, body_done
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge
                body_done = body_done or not msg.get("more_body", False)
            elif msg["type"] == "http.disconnect" and not started and not body_done:
                raise ClientGone  # left before its body was read; later disconnects reach the app (it cancels)
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                if cors:
                    msg = dict(msg, headers=list(msg.get("headers", [])) + cors)
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._send(send, *_json_error(
                    413, f"request body is over {self.max_body} bytes", "body_too_large"), "too_large")
        except ClientGone:
            if self.on_refused:
                self.on_refused("client_closed", 499)
        finally:
            self.inflight -= counted

