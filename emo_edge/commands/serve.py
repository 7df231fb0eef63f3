"""`emo-edge serve BUNDLE [--budget 2GB] [--host 127.0.0.1] [--port 8080] [--api-key KEY]`: an OpenAI-compatible
local server over a bundle (a swappable one gets the expert pool chosen per request; emo_edge/serve/). Needs the `serve`
extra (starlette, uvicorn, prometheus_client)."""

from __future__ import annotations

import click

from .options import BUDGET_HELP, POSITIVE, THREADS, bundle_option


def _bind(host: str, port: int):
    """The listening socket, bound here so that a port in use is one clear error (uvicorn then serves on it)."""
    import socket

    from ..errors import EmoEdgeError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise EmoEdgeError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise EmoEdgeError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(128)
    return sock


def _ready_line(engine) -> None:
    mem = engine.memory
    budget = f", budget {mem['budget'] / 2**20:.0f} MiB" if mem["budget"] else ""
    pc = getattr(engine, "prefix_cache", None)
    cache = f"; prefix cache {pc.max_bytes / 2**20:.0f} MiB" if pc is not None else "; prefix cache off"
    click.echo(f"ready: pools {', '.join(engine.pools)}; backbone RSS {mem['backbone_rss'] / 2**20:.0f} MiB, one "
               f"pool needs {mem['required_one_pool'] / 2**20:.0f} MiB{budget}{cache}", err=True)


def resolve_api_key(option: str | None, path: str | None) -> str | None:
    """The API key from --api-key, --api-key-file (not readable by others) or $EMO_EDGE_API_KEY, at most one."""
    import os
    import stat

    from ..errors import EmoEdgeError
    from ..schema import read_bounded

    env = os.environ.get("EMO_EDGE_API_KEY")
    given = [n for n, v in (("--api-key", option), ("--api-key-file", path), ("EMO_EDGE_API_KEY", env)) if v]
    if len(given) > 1:
        raise EmoEdgeError(f"the API key is given twice ({' and '.join(given)}); give one")
    if path:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise EmoEdgeError(f"--api-key-file {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise EmoEdgeError(f"--api-key-file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise EmoEdgeError(f"--api-key-file {path}: readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                               f"chmod 600 it")
        raw = read_bounded(path, EmoEdgeError, "not found", 64 << 10)
        try:
            option = raw.decode("utf-8").splitlines()[0] if raw.strip() else ""
        except UnicodeDecodeError:
            raise EmoEdgeError(f"--api-key-file {path}: not UTF-8 text") from None
    elif env:
        option = env
    if option is not None:
        option = option.strip()
        if not option:
            raise EmoEdgeError(f"{given[0]}: empty; give a non-empty API key")
        if any(ord(c) < 33 or ord(c) > 126 for c in option):
            raise EmoEdgeError(f"{given[0]}: the API key must be printable ASCII without spaces")
    return option


def _loopback(addr: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _imports():
    from ..errors import EmoEdgeError

    try:
        import starlette  # noqa: F401
        import uvicorn
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise EmoEdgeError(f"serve needs the 'serve' extra ({exc.name} is missing): "
                           f"python -m pip install -e '.[serve]'") from None
    return uvicorn


def register(cli: click.Group) -> None:
    @cli.command("serve", help="Serve a bundle over an OpenAI-compatible HTTP API (chat page at /). A swappable "
                               "bundle gets the expert pool chosen per request: body field \"pool\", model "
                               "\"BUNDLE:POOL\", or auto from the prompt; a static one serves its one pool.")
    @bundle_option
    @click.option("--budget", default=None, help=BUDGET_HELP)
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
    @click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
    @click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics. "
                  "Visible to every local user in `ps`: prefer $EMO_EDGE_API_KEY or --api-key-file.")
    @click.option("--api-key-file", default=None, help="Read the API key from this file (its first line); refused "
                  "when others can read it (chmod 600). The environment variable EMO_EDGE_API_KEY works too.")
    @click.option("--allow-host", "allow_hosts", multiple=True, help="Also accept requests whose Host header names "
                  "this (repeatable; '*' for any). By default only the listening address and localhost are "
                  "accepted, which stops DNS-rebinding pages.")
    @click.option("--allow-origin", "allow_origins", multiple=True, help="Let web pages of this origin (e.g. "
                  "http://localhost:3000) call the API (CORS; repeatable). Other cross-origin requests are 403.")
    @click.option("--max-tokens", default=1024, show_default=True, type=POSITIVE,
                  help="Tokens one sequence may hold (prompt + answer; at most the bundle's context).")
    @click.option("--aging", "aging", default=4, show_default=True, type=click.IntRange(0, 10_000),
                  help="A request passed over this many times by later ones (for the resident pool) is served next.")
    @click.option("--no-pool-grouping", is_flag=True, help="Serve strictly in arrival order (FIFO), for comparison.")
    @click.option("--prefix-cache", default="64MB", show_default=True,
                  help="KV cache kept after requests (per pool, least recently used out first), so a prompt that "
                       "starts with a kept one (earlier chat turns, a shared system prompt) prefills only the rest; "
                       "0 turns it off. Under --budget, at most half of what one pool leaves free.")
    @click.option("--threads", default=None, type=THREADS, help="onnxruntime intra-op threads (0 = its default).")
    def serve_cmd(bundle, budget, host, port, api_key, api_key_file, allow_hosts, allow_origins, max_tokens, aging,
                  no_pool_grouping, prefix_cache, threads):
        from pathlib import Path

        from ..errors import BundleError, EmoEdgeError
        from ..units import parse_size

        api_key = resolve_api_key(api_key, api_key_file)
        if not Path(bundle, "manifest.json").is_file():
            raise BundleError(f"{bundle}: not a bundle (no manifest.json)")
        budget_bytes = parse_size(budget, "--budget") if budget is not None else None
        cache_bytes = parse_size(prefix_cache, "--prefix-cache") if prefix_cache not in ("0", "") else 0
        from ..engine.swappable import is_swappable

        if budget_bytes is not None and not is_swappable(bundle):
            raise EmoEdgeError(f"--budget: {bundle} is a static bundle, whose memory was planned when it was "
                               f"exported (its report.json says how much); --budget applies to swappable bundles")
        uvicorn = _imports()
        from ..serve.app import ServerState, create_app
        from ..engine import open_engine

        sock = _bind(host, port)
        server_box = []

        def stop_on_error(exc):
            if server_box:
                server_box[0].should_exit = True

        def load():
            eng = open_engine(bundle, budget=budget, threads=threads, max_tokens=max_tokens,
                              progress=lambda msg: click.echo(msg, err=True))
            size = cache_bytes
            if budget_bytes is not None and size:  # what one pool leaves free under the budget, halved
                size = min(size, max(0, budget_bytes - eng.required_bytes()["total"]) // 2)
            if size >= eng.session_kv_bytes(64):
                eng.keep_prefixes(size)
            return eng

        state = ServerState(load,
                            api_key, aging, not no_pool_grouping, budget_bytes, on_load_error=stop_on_error,
                            on_ready=_ready_line)
        server = uvicorn.Server(uvicorn.Config(create_app(state, host, allow_hosts, allow_origins), log_level="warning", access_log=False))
        server_box.append(server)
        shown = sock.getsockname()
        if api_key is None and not _loopback(shown[0]):
            click.echo(f"warning: listening on {host}, reachable from other machines, with no --api-key", err=True)
        click.echo(f"serving {bundle} on http://{host}:{shown[1]} (loading the model; /health says 503 until "
                   f"ready){'' if api_key else '; no --api-key'}", err=True)
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
        if state.error is not None:
            if isinstance(state.error, EmoEdgeError):
                raise state.error
            raise EmoEdgeError(f"{bundle}: loading failed ({type(state.error).__name__}: {state.error})")
