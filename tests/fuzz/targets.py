"""The fuzz targets: for each loader of hostile input, the base it mutates, how, and how it is loaded.

Each target's `run(inp, env)` runs in the worker on one materialised input directory; it raises or returns.
Loaders are called through their public entry points (CheckpointView, Bundle, SwappableEngine, load_spec,
read_header, ...) so that the harness keeps working while their insides change. End-to-end targets also use
what they loaded (every tensor read; one forward; one pool swap) and call `env.probe()` while it is alive.

weight: share of the long campaign's iterations (cheap in-process parsers get most of the volume).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import mutate

IDS = [1, 2, 3, 4, 5]
EMBEDDED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "generation_config.json", "emo_edge_pools/math.json", "emo_edge_pools/code.json")


@dataclass(frozen=True)
class Target:
    name: str
    base: str  # base directory (bases.BASES)
    what: str
    cases: Callable  # (Ctx, files: dict[name, bytes], home: dict[name, bytes]) -> (Rand -> case)
    run: Callable  # (inp: Path, env) -> None
    e2e: bool = False  # loads onnxruntime sessions / reads everything: slower, fewer iterations
    home: bool = False  # uses the run's EMO_EDGE_HOME (the swappable bundle's prepared store)
    weight: float = 1.0
    limit: float | None = None  # seconds per iteration before it counts as a hang
    probes: bool = False  # its loader calls env.probe() (mapped and open files are then compared to before)

    @property
    def timeout(self) -> float:
        return self.limit or (60.0 if self.e2e else 15.0)


# ---- case makers: (Ctx, base files, home files) -> (Rand -> case) ---------------------------------------------
def only(name: str, manifest: bool = False, rehash: bool = False, escape: bool = True):
    return lambda ctx, files, home: lambda r: mutate.dir_mutant(r, files, ctx, manifest, rehash, only=(name,),
                                                                escape=escape)


def whole(manifest: bool = False, escape: bool = True):
    return lambda ctx, files, home: lambda r: mutate.dir_mutant(r, files, ctx, manifest, escape=escape)


def genai_cases(ctx, files, home):
    """genai_config.json mutated (manifest re-hashed), or its decoder pointed at the decoy model outside the bundle
    with a manifest entry for that name whose sha256 is right (the attack of issue 14 item 1)."""
    mutated = only("genai_config.json", True, rehash=True)(ctx, files, home)
    genai, manifest = json.loads(files["genai_config.json"]), json.loads(files["manifest.json"])

    def make(r):
        if r.int(0, 2):
            return mutated(r)
        g, m = json.loads(json.dumps(genai)), json.loads(json.dumps(manifest))
        old = g["model"]["decoder"]["filename"]
        new = r.pick([f"{ctx.decoy_rel}/{old}", f"{ctx.decoy_abs}/{old}", f"sub/../{ctx.decoy_rel}/{old}"])
        g["model"]["decoder"]["filename"] = new
        m["files"][new] = dict(m["files"][old])
        return {"files": {"genai_config.json": json.dumps(g).encode(), "manifest.json": json.dumps(m).encode()},
                "rehash": True}
    return make


def header_cases(ctx, files, home):
    raw = files["model.safetensors"]
    return lambda r: {"files": {"model.safetensors": mutate.safetensors(r, raw, ctx)}}


def prepared_cases(ctx, files, home):
    return lambda r: {"files": {}, "home_files": mutate.dir_mutant(r, home, ctx, False)["files"]}


def prepared_json_cases(ctx, files, home):
    name = next((n for n in home if n.endswith("prepared.json")), None)
    if name is None:
        raise LookupError("the swappable base has no prepared store (opening it failed; see base/home)")
    doc = json.loads(home[name])
    keys = ("model", "data", "sha256", "fc1", "fc2", "layers")
    return lambda r: {"files": {}, "home_files": {name: mutate.json_text(r, doc, ctx, extra_keys=keys)}}


# ---- loaders (worker side) ----------------------------------------------------------------------------------
def _touch(arr) -> None:
    arr.reshape(-1).view("uint8").sum()  # reads every byte of the mapped tensor


def load_checkpoint(inp: Path, env) -> None:
    from emo_edge.model.checkpoint import CheckpointView

    view = CheckpointView(inp)
    try:
        for name in view.tensors:
            _touch(view.raw(name))
        view.bytes_on_disk()
        env.probe()
    finally:
        view.close()


def load_header(inp: Path, env) -> None:
    from emo_edge.model.checkpoint import read_header

    read_header(inp / "model.safetensors")


def load_config(inp: Path, env) -> None:
    from emo_edge.model.spec import load_spec

    load_spec(inp).param_counts()
    load_checkpoint(inp, env)


def _base_view(env):
    from emo_edge.model.checkpoint import CheckpointView

    return env.untracked("view", lambda: CheckpointView(env.base / "ck"))


def load_pool_file(inp: Path, env) -> None:
    from emo_edge.pools.file import read_pool_file
    from emo_edge.pools.catalog import load_pool_path

    view = _base_view(env)
    read_pool_file(inp / "pool.json", view.spec)
    load_pool_path(inp / "pool.json", view)


def load_catalog(inp: Path, env) -> None:
    from emo_edge.pools.catalog import Catalog, load_pool_path
    from .bases import POOL_NAME

    view = _base_view(env)
    cat = Catalog(view, inp)
    cat.get(POOL_NAME)
    cat.entries()
    load_pool_path(inp / f"{POOL_NAME}.json", view)


def load_calibration(inp: Path, env) -> None:
    from emo_edge.pools.calib import load_calibration as load
    from emo_edge.model.tokenizer import TextTokenizer

    tok = env.untracked("tok", lambda: TextTokenizer(env.base / "ck" / "tokenizer.json"))
    for name in ("calib.jsonl", "calib.txt"):
        if (inp / name).exists() or (inp / name).is_symlink():
            load([inp / name], tok, max_tokens=64)


def load_target_file(inp: Path, env) -> None:
    from targets import load_target

    t = load_target(inp / "cpu.json")
    t.overhead_bytes(1 << 20, 512, 64)
    t.thresholds("int4")
    t.precisions_for("experts")
    t.kv_bytes_per_element, t.scale_bytes, t.to_dict()


def load_embedded(inp: Path, env) -> None:
    from emo_edge.model.checkpoint import CheckpointView
    from emo_edge.pools.catalog import Catalog
    from emo_edge.model.tokenizer import TextTokenizer

    view = CheckpointView(inp)
    try:
        cat = Catalog(view, env.work / "catalog")  # the shipped pools (emo_edge_pools/) and an empty writable one
        cat.entries()
        cat.get("math")
        tok = TextTokenizer(inp / "tokenizer.json")
        tok.decode(tok.encode("Solve for x: 3x + 5 = 20."))
        env.probe()
    finally:
        view.close()


def load_tokenizer_file(inp: Path, env) -> None:
    from emo_edge.model.tokenizer import TextTokenizer

    tok = TextTokenizer(inp / "tokenizer.json")
    for text in ("Solve for x: 3x + 5 = 20.", ">>> def f(n):\n...     return n * n\n", "a" * 2000, "\u00e9\U0001f600 12"):
        tok.decode(tok.encode(text))
    tok.decode([0, 1, 2, tok.vocab_size - 1])


def load_task_files(inp: Path, env) -> None:
    from emo_edge.evaluate.tasks import extract_answer, read_tasks

    for name in ("exact.jsonl", "choice.jsonl"):
        if (inp / name).exists() or (inp / name).is_symlink():
            ts = read_tasks(inp / name, extract="last_int")
            for item in ts.items:
                if item.extract:
                    extract_answer(item.extract, item.prompt)


def _http_app():
    from emo_edge.serve.app import ServerState, create_app

    state = ServerState(lambda: None, api_key="k3y", k=4, grouping=True, budget=None)  # never loaded: 503
    return create_app(state, "127.0.0.1")


async def _http_call(app, method: str, path: str, headers: list, body: bytes) -> list[int]:
    statuses: list[int] = []
    it = iter([body[i:i + 65536] for i in range(0, len(body), 65536)] or [b""])

    async def receive():
        c = next(it, None)
        return {"type": "http.disconnect"} if c is None else {"type": "http.request", "body": c, "more_body": True}

    async def send(msg):
        if msg["type"] == "http.response.start":
            statuses.append(msg["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 5), "server": ("127.0.0.1", 8080), "app": app}
    await app(scope, receive, send)
    return statuses


ROUTES = (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/health"), ("GET", "/v1/models"))


def send_http_request(inp: Path, env) -> None:
    """One crafted request (headers and body as files) through the server's ASGI app (guard + routes) in-process,
    on a server whose model never loads: every answer must be a 4xx or 503, never a 500 or an exception."""
    import asyncio

    def warm():  # imports and first-request set-up happen here, not in the audited case
        app = _http_app()
        ok = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"authorization", b"Bearer k3y")]
        for method, path in ROUTES:
            asyncio.run(_http_call(app, method, path, ok, b'{"model": "x", "prompt": "hi"}'))
        return app

    app = env.untracked("http_app", warm)
    raw = (inp / "headers.json").read_bytes() if (inp / "headers.json").is_file() else b"[]"
    try:
        pairs = json.loads(raw)
        headers = [(str(k).encode("latin-1", "replace"), str(v).encode("latin-1", "replace"))
                   for k, v in pairs] if isinstance(pairs, list) else []
    except (ValueError, TypeError, RecursionError):  # the case's header list is the harness's own encoding
        headers = [(b"x-raw", raw[:4096])]
    body = (inp / "body.json").read_bytes() if (inp / "body.json").is_file() else b""
    statuses = []
    for method, path in ROUTES:
        statuses += asyncio.run(_http_call(app, method, path, headers, body))
    bad = [s for s in statuses if s >= 500 and s != 503]
    if bad:
        raise AssertionError(f"the server answered {bad} to a crafted request")


def load_bundle(inp: Path, env) -> None:
    from emo_edge.engine import StaticEngine

    b = StaticEngine(inp, threads=1)
    b.logits(IDS)
    env.probe()


def load_swappable(inp: Path, env) -> None:
    from emo_edge.engine.swappable import SwappableEngine

    rt = SwappableEngine(inp, threads=1)
    try:
        names = sorted(rt.pools)
        if names:
            rt.use(names[-1])
        rt.logits(IDS)
        env.probe()
    finally:
        rt.close()


TARGET_LIST = [
    Target("safetensors_header", "ck", "read_header on crafted safetensors bytes", header_cases, load_header,
           weight=20),
    Target("config", "ck", "config.json -> EmoSpec (load_spec, then CheckpointView)", only("config.json"),
           load_config, weight=14, probes=True),
    Target("shard_index", "cks", "model.safetensors.index.json (CheckpointView + tensor reads)",
           only("model.safetensors.index.json"), load_checkpoint, weight=8, probes=True),
    Target("pool_file", "pool", "a bare pool file (read_pool_file, load_pool_path)", only("pool.json", escape=False),
           load_pool_file, weight=8),
    Target("catalog_entry", "cat", "a catalog entry (Catalog.get/entries, load_pool_path)", only("fz.json"),
           load_catalog, weight=8),
    Target("calibration", "calib", "calibration JSONL and plain text (load_calibration)",
           whole(escape=False), load_calibration, weight=3),
    Target("target_json", "target", "targets/*.json (load_target)", only("cpu.json", escape=False),
           load_target_file, weight=8),
    Target("embedded", "tiny", "the embedded emo-tiny: config, tokenizer, shipped pools (CheckpointView, Catalog)",
           lambda ctx, files, home: lambda r: mutate.dir_mutant(r, files, ctx, False, only=EMBEDDED_FILES),
           load_embedded, weight=3, probes=True),
    Target("tokenizer", "tiny", "tokenizer.json (TextTokenizer: structure checks, load, encode, decode)",
           only("tokenizer.json", escape=False), load_tokenizer_file, weight=4),
    Target("task_file", "tasks", "eval task files, exact answer and multiple choice (read_tasks)",
           whole(escape=False), load_task_files, weight=4),
    Target("http_request", "http", "one HTTP request's headers and body through the server (guard + routes)",
           whole(escape=False), send_http_request, weight=4),
    Target("checkpoint", "ck", "CheckpointView + every tensor read, any file mutated", whole(), load_checkpoint,
           weight=8, probes=True),
    Target("checkpoint_sharded", "cks", "sharded CheckpointView + every tensor read, any file mutated", whole(),
           load_checkpoint, weight=4, probes=True),
    Target("manifest_static", "static", "manifest.json of a static bundle (Bundle + one forward)",
           only("manifest.json", True), load_bundle, e2e=True, weight=3, probes=True),
    Target("genai_config", "static", "genai_config.json, manifest re-hashed (Bundle + one forward)",
           genai_cases, load_bundle, e2e=True, weight=2, probes=True),
    Target("bundle", "static", "static bundle, any file mutated, sometimes re-hashed (Bundle + forward)",
           whole(True), load_bundle, e2e=True, weight=3, probes=True),
    Target("manifest_swappable", "swap", "manifest.json of a swappable bundle (SwappableEngine + swap + forward)",
           only("manifest.json", True), load_swappable, e2e=True, home=True, weight=0.25, probes=True),
    Target("prepared_json", "swap", "prepared.json of the prepared store (SwappableEngine + swap + forward)",
           prepared_json_cases, load_swappable, e2e=True, home=True, weight=0.15, probes=True),
    Target("prepared_store", "swap", "any prepared-store file mutated (SwappableEngine + swap + forward)",
           prepared_cases, load_swappable, e2e=True, home=True, weight=0.1, probes=True),
    Target("swappable", "swap", "swappable bundle, any file mutated, sometimes re-hashed (SwappableEngine)",
           whole(True), load_swappable, e2e=True, home=True, weight=0.3, probes=True),
]
TARGETS = {t.name: t for t in TARGET_LIST}


# ---- the harness's own check: loaders that misbehave on purpose, each must be classified as such ---------------
def _selftest(inp: Path, env) -> None:
    how = (inp / "pool.json").read_bytes()
    if how == b"crash":
        raise ValueError("deliberate")
    if how == b"typed":
        from emo_edge.errors import PoolError
        raise PoolError("deliberate")
    if how == b"hang":
        import time
        time.sleep(60)
    if how == b"outside":
        (inp / ".." / "decoy" / "pool.json").read_bytes()
    if how == b"die":
        import os
        os._exit(3)


SELF_TEST = Target("selftest", "pool", "the harness's own check", only("pool.json"), _selftest, limit=2.0)
ALL_TARGETS = {**TARGETS, SELF_TEST.name: SELF_TEST}
