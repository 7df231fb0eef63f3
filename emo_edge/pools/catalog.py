"""Pools, their catalog, built-in domains, and composition.

A catalog entry is one JSON file `<name>.json` (format "emo-edge-pool", version 1) holding: the name, the
per-layer routed expert ids (source numbering; null = dense layer), the discovery method, the per-layer N (and
the fraction asked for, if any), the calibration provenance (file base names, sha256, documents, tokens), the
source checkpoint's identity (sha256 of config + tensor headers) and per-layer statistics. Entries carry no
timestamps or paths, so the same inputs give byte-identical entries.

Where entries live (consulted in this order):
1. `CKPT/emo_edge_pools/*.json`: read-only catalogs shipped beside a checkpoint (the embedded default model).
2. the writable catalog: `--catalog DIR` if given (entries directly in DIR), else the per-user cache
   `$EMO_EDGE_HOME/pools/<identity[:16]>/` (default `~/.cache/emo-edge/pools/<identity[:16]>/`), keyed by the
   checkpoint identity. Discovered pools (built-in domains included) are written there, atomically.
An entry whose identity is not the checkpoint's is refused.

Built-in domains (`math`, `code`, `prose`, `chat`) are discovered on first use from
`emo_edge/data/calib/<domain>.jsonl` (method layerwise, fraction 0.25 unless told otherwise) and cached as
`<domain>` (or `<domain>@<fraction>` at another fraction).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from typing import Annotated, Optional

from pydantic import Field

from ..model.checkpoint import CheckpointView
from ..errors import EmoEdgeError, PoolError
from ..fsutil import atomic_write
from ..model.hfconfig import MAX_LAYERS
from ..model.locate import hf_cache_entry
from .file import PoolFile, parse_pool, pool_json
from ..schema import Count, Finite, Int, Schema, Sha256, Str, confined, load_json, validate
from ..model.spec import EmoSpec

FORMAT, VERSION = "emo-edge-pool", 1
SHIPPED_DIR = "emo_edge_pools"
BUILTIN_DOMAINS = ("math", "code", "prose", "chat")
BUILTIN_CALIB = Path(__file__).resolve().parents[1] / "data" / "calib"
DEFAULT_FRACTION = 0.25
DEFAULT_METHOD = "layerwise"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


@dataclass
class Pool:
    name: str
    layers: list[list[int] | None]
    identity: str | None = None  # source checkpoint identity (None: a bare pool file)
    method: str | None = None
    experts: list[int | None] | None = None  # per-layer N
    fraction: float | None = None
    calibration: dict | None = None
    stats: list[dict | None] | None = None
    origin: str = ""  # where it was read from (not stored)
    readonly: bool = field(default=False, compare=False)

    def to_entry(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "checkpoint": {"identity": self.identity},
            "method": self.method,
            "experts": self.experts,
            "fraction": self.fraction,
            "calibration": self.calibration,
            "layers": self.layers,
            "stats": self.stats,
        }

    def entry_json(self) -> str:
        return json.dumps(self.to_entry(), indent=1) + "\n"

    def pool_file_json(self) -> str:
        return pool_json(self.layers)

    @classmethod
    def from_entry(cls, data, spec: EmoSpec, where: str) -> "Pool":
        """A catalog entry, validated against `PoolEntry` (and its layers against `spec`)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PoolError(f"{where}: not an emo-edge pool entry (format '{FORMAT}')")
        if data.get("version") != VERSION or isinstance(data.get("version"), bool):
            raise PoolError(f"{where}: pool entry version {data.get('version')!r} is not supported (need {VERSION})")
        entry = validate(data, PoolEntry, where, PoolError)
        layers = parse_pool(data, spec, where)
        # the stored dicts are kept as read (validated), so re-writing an entry reproduces it byte for byte
        return cls(name=entry.name, layers=layers, identity=entry.checkpoint.identity, method=entry.method,
                   experts=data.get("experts"), fraction=entry.fraction, calibration=data.get("calibration"),
                   stats=data.get("stats"), origin=where)


# ---- the catalog-entry schema (pydantic, via emo_edge.schema): types and bounds of every stored field ----
class CalibFileEntry(Schema):
    name: Str
    sha256: Sha256
    documents: Count
    tokens: Count


class CalibrationEntry(Schema):
    files: Annotated[list[CalibFileEntry], Field(max_length=1 << 16)] = []
    documents: Count
    tokens: Count
    max_tokens_per_document: Optional[Count] = None


class LayerStats(Schema):
    routed: Count
    kept: Count
    coverage: Finite
    topk_hit: Finite
    score_coverage: Optional[Finite] = None
    scores: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Finite] = {}  # expert id -> score share


class CheckpointRef(Schema):
    identity: Optional[Sha256] = None


class PoolEntry(PoolFile):
    """A catalog entry (format "emo-edge-pool", version 1); see the module docstring."""

    format: Str
    version: Int
    name: Annotated[str, Field(strict=True, pattern=f"^{_NAME.pattern}$")]
    checkpoint: CheckpointRef = CheckpointRef()
    method: Optional[Str] = None
    experts: Optional[Annotated[list[Optional[Count]], Field(max_length=MAX_LAYERS)]] = None
    fraction: Optional[Finite] = None
    calibration: Optional[CalibrationEntry] = None
    stats: Optional[Annotated[list[Optional[LayerStats]], Field(max_length=MAX_LAYERS)]] = None


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise PoolError(f"pool name {name!r} is not valid (letters, digits, '.', '_', '-', '@', '+'; at most 64)")
    return name


def default_catalog_dir(identity: str) -> Path:
    home = os.environ.get("EMO_EDGE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "emo-edge")
    return Path(home) / "pools" / identity[:16]


class Catalog:
    """The pool catalogs of one checkpoint: the shipped read-only one, then the writable one."""

    def __init__(self, view: CheckpointView, directory: str | Path | None = None):
        self.view, self.spec, self.identity = view, view.spec, view.identity
        self.writable = Path(directory) if directory else default_catalog_dir(view.identity)
        self.shipped = Path(view.root) / SHIPPED_DIR
        if directory is not None and self.writable.exists() and not self.writable.is_dir():
            raise PoolError(f"--catalog {directory}: not a directory")

    def _dirs(self) -> list[tuple[Path, bool]]:
        return [(self.shipped, True), (self.writable, False)]

    def _read(self, path: Path, readonly: bool) -> Pool:
        if readonly:  # shipped beside the checkpoint: must not lead out of it (nor out of its hub cache entry)
            confined(self.view.root, f"{SHIPPED_DIR}/{path.name}", str(path), PoolError,
                     allowed_root=hf_cache_entry(self.view.root))
        pool = _checked_entry(load_json(path, PoolError), self.view, path)
        pool.readonly = readonly
        return pool

    def path(self, name: str) -> Path:
        return self.writable / f"{check_name(name)}.json"

    def get(self, name: str) -> Pool | None:
        check_name(name)
        for d, ro in self._dirs():
            p = d / f"{name}.json"
            if os.path.lexists(p):  # whatever it is: the bounded reader refuses a FIFO or device in one line
                return self._read(p, ro)
        return None

    def entries(self) -> tuple[list[Pool], list[str]]:
        """All usable entries (shipped first; a shipped name hides a writable one) and one line per refused
        entry."""
        seen: dict[str, Pool] = {}
        refused: list[str] = []
        for d, ro in self._dirs():
            if not d.is_dir():
                continue
            for p in sorted(d.glob("*.json")):
                if p.stem in seen:
                    continue
                try:
                    seen[p.stem] = self._read(p, ro)
                except PoolError as exc:
                    refused.append(str(exc))
        return list(seen.values()), refused

    def put(self, pool: Pool, force: bool = False) -> Path:
        path = self.path(pool.name)
        if pool.identity != self.identity:
            raise PoolError(f"pool '{pool.name}' is not from this checkpoint; refusing to store it")
        text = pool.entry_json()
        if (self.shipped / path.name).is_file():
            raise PoolError(f"pool '{pool.name}' is shipped read-only with the checkpoint ({self.shipped}); "
                            f"choose another name")
        if path.is_file():
            try:
                same = path.read_text(encoding="utf-8") == text
            except (OSError, UnicodeDecodeError):
                same = False
            if same:
                return path
            if not force:
                raise PoolError(f"{path}: pool '{pool.name}' already exists (use --force to replace it)")
        created = [d for d in (path.parent, *path.parent.parents) if not os.path.lexists(d)]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, text, force=True)  # an existing entry was checked above (--force or identical)
        except (OSError, EmoEdgeError) as exc:
            for d in created:  # the directories this call made, deepest first: nothing is left behind
                try:
                    d.rmdir()
                except OSError:
                    break
            if isinstance(exc, OSError):
                raise PoolError(f"{path.parent}: cannot create catalog directory ({exc.strerror})") from None
            raise
        pool.origin = str(path)
        return path


# ---- discovery entry points ------------------------------------------------------------------------------
def discover_pool(view: CheckpointView, name: str, calib_files: Sequence[str | Path], *,
                  method: str = DEFAULT_METHOD, experts=None, fraction: float | None = None,
                  max_tokens: int | None = None, max_docs: int | None = None, progress=None, log=None) -> Pool:
    """Discover a pool from calibration files (not stored; see `Catalog.put`). `log(line)` is told
    "discovering pool 'NAME' (N documents, T tokens)" once the calibration is read."""
    from ..model.tokenizer import load_tokenizer
    from .calib import load_calibration

    check_name(name)
    limit = max_tokens or min(1024, view.spec.max_position_embeddings or 1024)
    # read first: bad calibration input fails fast, before torch is imported (read once: it may be a pipe)
    cal = load_calibration(list(calib_files), load_tokenizer(view.root), max_tokens=limit, max_docs=max_docs)
    from ..model.reference import Reference
    from .discover import discover, pool_sizes

    sizes = pool_sizes(view.spec, experts, fraction)  # validate sizes before the model is touched
    if log:
        log(f"discovering pool '{name}' ({len(cal.docs)} documents, {cal.tokens} tokens; {method}, "
            + (f"{experts} experts" if experts is not None else f"fraction {fraction or DEFAULT_FRACTION:g}")
            + f", from {', '.join(f.name for f in cal.files)})")
    ref = Reference(view, streaming=True)
    layers, stats = discover(ref, cal.docs, method, sizes, progress=progress)
    return Pool(name=name, layers=layers, identity=view.identity, method=method, experts=sizes,
                fraction=None if experts is not None else float(fraction or DEFAULT_FRACTION),
                calibration=cal.provenance(), stats=stats, origin="discovered")


def ship_builtin_pools(checkpoint: str | Path) -> list[Path]:
    """(Re)write the read-only catalog shipped beside a checkpoint (`CKPT/emo_edge_pools/`) with the built-in
    domains' default pools, exactly as first-use discovery would produce them."""
    from ..fsutil import atomic_write

    view = CheckpointView(checkpoint)
    out_dir = Path(checkpoint) / SHIPPED_DIR
    out_dir.mkdir(exist_ok=True)
    written = []
    for domain in BUILTIN_DOMAINS:
        pool = discover_pool(view, builtin_entry_name(domain, None), [builtin_calib(domain)],
                             method=DEFAULT_METHOD, fraction=DEFAULT_FRACTION)
        written.append(atomic_write(out_dir / f"{pool.name}.json", pool.entry_json(), force=True))  # ours
    return written


def builtin_calib(domain: str) -> Path:
    path = BUILTIN_CALIB / f"{domain}.jsonl"
    if not path.is_file():
        raise PoolError(f"built-in calibration set for '{domain}' is missing ({path})")
    return path


def builtin_entry_name(domain: str, fraction: float | None, method: str = DEFAULT_METHOD) -> str:
    name = domain
    if fraction is not None and float(fraction) != DEFAULT_FRACTION:
        name += f"@{float(fraction):g}"
    if method != DEFAULT_METHOD:
        name += f"+{method}"
    return name


def _looks_like_file(item: str) -> bool:
    return item.endswith(".json") or os.sep in item or "/" in item


def load_pool_path(path: str | Path, view: CheckpointView) -> Pool:
    """A pool from a file: a catalog entry (identity checked) or a bare {"layers": [...]} pool file."""
    path = Path(path)
    data = load_json(path, PoolError, "pool file not found")
    if isinstance(data, dict) and "format" in data:
        return _checked_entry(data, view, path)
    return Pool(name=path.stem, layers=parse_pool(data, view.spec, str(path)), origin=str(path))


def _checked_entry(data, view: CheckpointView, path: Path) -> Pool:
    """A catalog entry validated and refused unless it was discovered on `view`'s checkpoint."""
    if isinstance(data, dict) and data.get("format") == FORMAT:
        ref = data.get("checkpoint")
        ident = ref.get("identity") if isinstance(ref, dict) else None
        if ident != view.identity:
            raise PoolError(f"{path}: pool '{data.get('name')}' was discovered on another checkpoint "
                            f"(identity {str(ident)[:12]}, this one is {view.identity[:12]}); refusing it")
    return Pool.from_entry(data, view.spec, str(path))


def resolve_pools(view: CheckpointView, names_or_files: Sequence[str], catalog: Catalog | str | Path | None = None,
                  fraction: float | None = None, method: str = DEFAULT_METHOD, progress=None,
                  log=None) -> list[Pool]:
    """Pools by catalog name, built-in domain name (discovered and cached on first use) or pool JSON file path.
    `fraction` and `method` only apply to built-in domains that must be (re)discovered."""
    cat = catalog if isinstance(catalog, Catalog) else Catalog(view, catalog)
    items = [s.strip() for item in names_or_files for s in str(item).split(",") if s.strip()]
    if not items:
        raise PoolError("no pools named")
    out: list[Pool] = []
    for item in items:
        if _looks_like_file(item):
            out.append(load_pool_path(item, view))
            continue
        check_name(item)
        if item in BUILTIN_DOMAINS:
            entry = builtin_entry_name(item, fraction, method)
            pool = cat.get(entry)
            if pool is None:
                pool = discover_pool(view, entry, [builtin_calib(item)], method=method,
                                     fraction=fraction or DEFAULT_FRACTION, progress=progress, log=log)
                cat.put(pool)
            out.append(pool)
            continue
        pool = cat.get(item)
        if pool is None:
            known, _ = cat.entries()
            names = sorted({p.name for p in known} | set(BUILTIN_DOMAINS))
            raise PoolError(f"unknown pool '{item}' (known: {', '.join(names)}; or give a pool .json file)")
        if fraction is not None and pool.fraction != fraction:
            raise PoolError(f"pool '{item}' was discovered at {pool.fraction or pool.experts}, not fraction "
                            f"{fraction:g}; discover it again with `pools discover --fraction`")
        out.append(pool)
    return out


# ---- composition -----------------------------------------------------------------------------------------
def compose(pools: Sequence[Pool | Sequence[Sequence[int] | None]]) -> list[list[int] | None]:
    """The per-layer union of pools (None at a layer = all experts, which absorbs the union)."""
    if not pools:
        raise PoolError("nothing to compose")
    layer_lists = [p.layers if isinstance(p, Pool) else list(p) for p in pools]
    n = len(layer_lists[0])
    if any(len(layers) != n for layers in layer_lists):
        raise PoolError("pools have different numbers of layers")
    out: list[list[int] | None] = []
    for i in range(n):
        entries = [layers[i] for layers in layer_lists]
        out.append(None if any(e is None for e in entries) else sorted(set().union(*map(set, entries))))
    return out


def jaccard(a: Sequence[int] | None, b: Sequence[int] | None) -> float | None:
    if a is None or b is None:
        return None
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0
