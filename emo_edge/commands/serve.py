"""`emo-edge serve BUNDLE [--budget 2GB] [--host 127.0.0.1] [--port 8080] [--api-key KEY]`: an OpenAI-compatible
local server over a bundle (a swappable one gets the expert pool chosen per request; emo_edge/serve/). Needs the `serve`
extra (starlette, uvicorn, prometheus_client)."""

from __future__ import annotations

import click

from .options import BUDGET_HELP, POSITIVE, THREADS


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
    click.echo(f"ready: pools {', '.join(engine.pools)}; backbone RSS {mem['backbone_rss'] / 2**20:.0f} MiB, one "
               f"pool needs {mem['required_one_pool'] / 2**20:.0f} MiB{budget}", err=True)


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
    @click.argument("bundle")
    @click.option("--budget", default=None, help=BUDGET_HELP)
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
    @click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
    @click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics.")
    @click.option("--max-tokens", default=1024, show_default=True, type=POSITIVE,
                  help="Tokens one sequence may hold (prompt + answer; at most the bundle's context).")
    @click.option("--aging", "aging", default=4, show_default=True, type=click.IntRange(0, 10_000),
                  help="A request passed over this many times by later ones (for the resident pool) is served next.")
    @click.option("--no-pool-grouping", is_flag=True, help="Serve strictly in arrival order (FIFO), for comparison.")
    @click.option("--threads", default=None, type=THREADS, help="onnxruntime intra-op threads (0 = its default).")
    def serve_cmd(bundle, budget, host, port, api_key, max_tokens, aging, no_pool_grouping, threads):
        from pathlib import Path

        from ..errors import BundleError, EmoEdgeError
        from ..units import parse_size

        if not Path(bundle, "manifest.json").is_file():
            raise BundleError(f"{bundle}: not a bundle (no manifest.json)")
        if api_key is not None and not api_key.strip():
            raise EmoEdgeError("--api-key: empty")
        budget_bytes = parse_size(budget, "--budget") if budget is not None else None
        uvicorn = _imports()
        from ..serve.app import ServerState, create_app
        from ..engine import open_engine

        sock = _bind(host, port)
        server_box = []

        def stop_on_error(exc):
            if server_box:
                server_box[0].should_exit = True

        state = ServerState(lambda: open_engine(bundle, budget=budget, threads=threads, max_tokens=max_tokens,
                                                progress=lambda msg: click.echo(msg, err=True)),
                            api_key, aging, not no_pool_grouping, budget_bytes, on_load_error=stop_on_error,
                            on_ready=_ready_line)
        server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", access_log=False))
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
