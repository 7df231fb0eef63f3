"""The valid inputs every mutant starts from, built once per run directory with the project's own CLI and cached
(rebuilt when emo_edge's sources change):

    ck      `synth --preset tiny` (one model.safetensors, bf16)
    cks     the same, sharded (`--shard-size 100KB`, with model.safetensors.index.json)
    static  `export --model ck --pools all.json --precision int4 --no-verify` (model.onnx + data)
    swap    the same with --swappable and two pools (backbone segments, routers, expert shards)
    home    an EMO_EDGE_HOME holding swap's prepared store (prepared.json + prepacked experts)
    pool    a bare pool file;  cat  a catalog entry of ck;  calib  JSONL and plain calibration text
    target  a copy of targets/cpu.json
    tiny    a copy of the embedded emo_edge/models/emo-tiny (its shipped pools included)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("fuzz")
BASES = ("ck", "cks", "static", "swap", "home", "pool", "cat", "calib", "target", "tiny", "tasks", "http")
POOL_NAME = "fz"


def source_stamp() -> str:
    """Hash of the sources that decide what the bases look like."""
    h = hashlib.sha256()
    for d in ("emo_edge", "exporters", "targets"):
        for p in sorted((ROOT / d).rglob("*")):
            if p.suffix in (".py", ".json") and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(ROOT)).encode() + p.read_bytes())
    return h.hexdigest()[:16]


def _cli(*args: str, env: dict | None = None) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, cwd=str(ROOT))
    if r.returncode != 0:
        raise RuntimeError(f"building a fuzz base failed: cli.py {' '.join(args)}\n{r.stdout}\n{r.stderr}")


def _pools(ck: Path, dest: Path) -> tuple[Path, Path]:
    """Two pool files of ck: every routed expert, and the first half of them."""
    from emo_edge.model.spec import load_spec

    spec = load_spec(ck)
    full, half = [], []
    for layer in spec.layers:
        routed = list(layer.routed_experts) if layer.num_experts else None
        full.append(routed)
        half.append(routed[: max(layer.routed_k, len(routed) // 2)] if routed else None)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "all.json").write_text(json.dumps({"layers": full}))
    (dest / "half.json").write_text(json.dumps({"layers": half}))
    return dest / "all.json", dest / "half.json"


def _catalog_entry(ck: Path, dest: Path) -> None:
    from emo_edge.model.checkpoint import CheckpointView
    from emo_edge.pools.catalog import Pool

    view = CheckpointView(ck)
    layers = json.loads((dest.parent / "pools" / "half.json").read_text())["layers"]
    pool = Pool(name=POOL_NAME, layers=layers, identity=view.identity, method="mass",
                experts=[len(x) if x else None for x in layers], fraction=0.5,
                calibration={"files": [], "documents": 0, "tokens": 0}, stats=[None for _ in layers])
    dest.mkdir()
    (dest / f"{POOL_NAME}.json").write_text(pool.entry_json())


def _calib(dest: Path) -> None:
    dest.mkdir()
    lines = (ROOT / "emo_edge/data/calib/math.jsonl").read_text().splitlines()[:3]
    (dest / "calib.jsonl").write_text("\n".join(lines) + "\n")
    docs = [json.loads(x)["text"].replace("\n\n", "\n") for x in lines]
    (dest / "calib.txt").write_text("\n\n".join(docs) + "\n")


def build(base: Path, rebuild: bool = False) -> Path:
    """Build (or reuse) every base under `base`; returns `base`."""
    stamp = source_stamp()
    if not rebuild and (base / "STAMP").is_file() and (base / "STAMP").read_text() == stamp:
        return base
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    log.info("building fuzz bases under %s", base)
    ck, cks = base / "ck", base / "cks"
    _cli("synth", str(ck), "--preset", "tiny")
    _cli("synth", str(cks), "--preset", "tiny", "--shard-size", "100KB")
    full, half = _pools(ck, base / "pools")
    home = {"EMO_EDGE_HOME": str(base / "home")}
    _cli("export", "--model", str(ck), "--pools", str(full), "--precision", "int4", "--no-verify",
         "--out", str(base / "static"), env=home)
    _cli("export", "--model", str(ck), "--pools", f"{full},{half}", "--precision", "int4", "--no-verify",
         "--swappable", "--out", str(base / "swap"), env=home)
    r = subprocess.run([sys.executable, "-c", "import sys; from emo_edge.engine import SwappableEngine as S; "
                        "S(sys.argv[1]).close()", str(base / "swap")], capture_output=True, text=True,
                       env={**os.environ, **home}, cwd=str(ROOT))
    shutil.rmtree(base / "home" / "pools", ignore_errors=True)  # only the prepared store belongs to this base
    (base / "home").mkdir(exist_ok=True)
    if r.returncode != 0:  # the swappable targets will report their base refused; the others still run
        log.warning("opening the swappable base failed: %s", r.stderr.strip().splitlines()[-1:])
        (base / "home" / "OPEN_FAILED.txt").write_text(r.stderr)
    (base / "pool").mkdir()
    shutil.copy(half, base / "pool" / "pool.json")
    _catalog_entry(ck, base / "cat")
    _calib(base / "calib")
    (base / "target").mkdir()
    shutil.copy(ROOT / "targets" / "cpu.json", base / "target" / "cpu.json")
    shutil.copytree(ROOT / "emo_edge" / "models" / "emo-tiny", base / "tiny",
                    ignore=shutil.ignore_patterns("*.png", "README.md"))
    _tasks(base / "tasks")
    _http(base / "http")
    (base / "STAMP").write_text(stamp)
    return base


def _tasks(dest: Path) -> None:
    """A task file of each kind (emo-edge eval --tasks)."""
    dest.mkdir()
    exact = (ROOT / "emo_edge/data/tasks/arithmetic.jsonl").read_text().splitlines()[:3]
    (dest / "exact.jsonl").write_text("\n".join(exact) + "\n")
    choice = [{"prompt": "What is 2 + 2?", "choices": [" 3", " 4", " 5"], "label": 1},
              {"prompt": "Solve for x: 2x + 1 = 7.", "choices": [" x = 3", " x = 4"], "label": 0}]
    (dest / "choice.jsonl").write_text("".join(json.dumps(c) + "\n" for c in choice))


def _http(dest: Path) -> None:
    """One HTTP request to `emo-edge serve`: its headers (JSON pairs) and its body."""
    dest.mkdir()
    headers = [["host", "127.0.0.1:8080"], ["content-type", "application/json"], ["content-length", "120"],
               ["authorization", "Bearer k3y"], ["origin", "http://127.0.0.1:8080"]]
    (dest / "headers.json").write_text(json.dumps(headers))
    body = {"model": "b:math", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 4,
            "temperature": 0.5, "stream": False, "pool": "math"}
    (dest / "body.json").write_text(json.dumps(body))


def read_files(d: Path) -> dict[str, bytes]:
    """Every regular file under `d` by relative name."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}


def make_decoys(base: Path, decoy: Path) -> tuple[str, ...]:
    """Copies (hard links) of the base files, flat, outside every input directory: where ../ paths lead."""
    shutil.rmtree(decoy, ignore_errors=True)
    decoy.mkdir(parents=True)
    names = []
    for b in ("ck", "static", "swap", "pool", "calib", "target"):
        for p in sorted((base / b).iterdir()):
            if p.is_file() and not (decoy / p.name).exists():
                os.link(p, decoy / p.name)
                names.append(p.name)
    return tuple(names)
