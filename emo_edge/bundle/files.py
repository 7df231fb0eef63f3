"""An exported bundle's files: its manifest (bounded, validated), the size and sha256 of every file it lists,
and whether a pool file names its experts. Running a bundle is the engine's (emo_edge/engine/)."""

from __future__ import annotations

import hashlib
from pathlib import Path


from ..errors import BundleError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    from ..schema import open_regular

    h = hashlib.sha256()
    with open_regular(path, BundleError) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_manifest(root: Path) -> dict:
    """manifest.json, bounded and validated against `bundle_schema.Manifest` (a plain dict for the loaders);
    a manifest that is a symlink out of the bundle is refused."""
    from .schema import read_manifest as read
    from ..schema import confined

    root = Path(root)
    if (root / MANIFEST).is_symlink():
        confined(root, MANIFEST, f"{root / MANIFEST}", BundleError)
    return read(root)


def check_files(root: Path, manifest: dict, skip: set | frozenset = frozenset()) -> None:
    """Every file listed in the manifest is a plain name inside the bundle (symlinks resolved), exists, and has
    its size and sha256 (`skip`: names checked otherwise, e.g. expert shards hashed per record)."""
    from ..schema import confined

    for name, entry in sorted(manifest["files"].items()):
        p = confined(root, name, f"{root / MANIFEST}: field 'files.{name}'", BundleError)
        if not p.is_file():
            raise BundleError(f"{p}: missing (listed in {MANIFEST})")
        if p.stat().st_size != entry["bytes"]:
            raise BundleError(f"{p}: has {p.stat().st_size} bytes, manifest says {entry['bytes']} (corrupted)")
        if name not in skip and sha256_file(p) != entry["sha256"]:
            raise BundleError(f"{p}: sha256 mismatch (corrupted or modified)")


def pool_matches(manifest: dict, pool_file: str | Path) -> None:
    """A --pool given with a bundle must name exactly the bundle's routed experts (the bundle cannot change them)."""
    from ..pools.file import PoolFile  # the one pool-file schema (bounded)
    from ..schema import load_json, validate

    data = load_json(pool_file, BundleError, "pool file not found")
    layers = validate(data, PoolFile, str(pool_file), BundleError).layers
    remap = manifest.get("experts")
    if not isinstance(remap, list) or not all(isinstance(r, dict) for r in remap):
        raise BundleError(f"{MANIFEST}: field 'experts' is missing or not a list of layer records, so the bundle's "
                          f"experts cannot be matched against {pool_file}")
    if len(layers) != len(remap):
        raise BundleError(f"{pool_file}: has {len(layers)} layers, the bundle has {len(remap)}")
    for entry, rec in zip(layers, remap):
        if rec["routing"] == "dense":
            continue
        want = set(rec["routed_source_ids"])
        got = None if entry is None else set(entry) - set(rec["implicit_source_ids"])
        if got is not None and got != want:
            raise BundleError(f"{pool_file}: layer {rec['layer']} asks for experts {sorted(got)}, but the bundle "
                              f"holds {sorted(want)}; export a bundle for that pool")
