"""What a bundle's JSON must look like, and the rules that keep a bundle's loaders inside what its manifest
covers. Device side: pydantic, numpy and onnx (protobuf only, for the graphs' external-data locations).

Threat model: a bundle is downloaded and shared, and its manifest is not signed. A crafted bundle must not make
the loaders read outside the bundle directory or use bytes nothing checks; a consistent, re-hashed manifest is
accepted, but then everything loaded is what it hashes. So:

  * manifest.json, genai_config.json (or the manifest's `swappable.model`), prepared.json and pool files are
    validated against the schemas below before any field is used (`schema.validate`: one line naming the file
    and the field);
  * every path a bundle file names goes through `bundle_file`: a plain relative name, inside the bundle root
    after symlinks are resolved, and listed in the manifest's `files` (whose sha256 `bundle.check_files`
    checks); the external-data files an ONNX graph names are found from the graph and held to the same rule;
  * expert shards are hashed per record: the records must tile the shard exactly (`check_shard_layout`), so
    every byte of it is either inside a record's sha256 or padding the reader checks is zero.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field

from ..errors import BundleError
from ..schema import Count, Int, Positive, Schema, Sha256, Str, confined, validate

MANIFEST = "manifest.json"

# Model dimensions are bounded far above any real model (emo-14b: 16 layers, 2 KV heads of 128, vocab 100k) so
# that a crafted value cannot make the runtime allocate tables of that size before the graph disagrees.
Layers = Annotated[int, Field(strict=True, ge=1, le=4096)]
Heads = Annotated[int, Field(strict=True, ge=1, le=4096)]
HeadSize = Annotated[int, Field(strict=True, ge=1, le=65536)]
Vocab = Annotated[int, Field(strict=True, ge=1, le=1 << 31)]
Context = Annotated[int, Field(strict=True, ge=1, le=1 << 31)]
TokenId = Annotated[int, Field(strict=True, ge=0, le=1 << 31)]
DType = Literal["uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64"]


# ---------------------------------------------------------------------------------------------------------
# the decoder dimensions: genai_config.json's "model" section, also copied into a swappable manifest
# ---------------------------------------------------------------------------------------------------------
class Decoder(Schema):
    filename: Optional[Str] = None  # required in a static bundle's genai_config.json (checked by its loader)
    num_hidden_layers: Layers
    num_key_value_heads: Heads
    head_size: HeadSize


class ModelDims(Schema):
    context_length: Context
    vocab_size: Vocab
    eos_token_id: Optional[TokenId] = None
    decoder: Decoder


class GenaiConfig(Schema):
    model: ModelDims


# ---------------------------------------------------------------------------------------------------------
# manifest.json
# ---------------------------------------------------------------------------------------------------------
class FileEntry(Schema):
    bytes: Count
    sha256: Sha256


class LayerExperts(Schema):
    layer: Count
    routing: Str
    routed_source_ids: list[Count] = []
    implicit_source_ids: Optional[list[Count]] = None


class Source(Schema):
    identity: Optional[Str] = None


class Segment(Schema):
    file: Str
    inputs: list[Str]
    outputs: list[Str]


class Router(Schema):
    offset: Count
    shape: Annotated[list[Positive], Field(min_length=2, max_length=2)]
    dtype: Literal["float32"]


class Part(Schema):
    name: Str
    dtype: DType
    shape: Annotated[list[Positive], Field(max_length=8)]
    nbytes: Positive


class Record(Schema):
    source_id: Count
    offset: Count
    sha256: Sha256


class MoEBlock(Schema):
    layer: Count
    index: Count
    template: Str
    x: Str
    y: Str
    router_weight: Str
    router: Router
    routing: Str
    routed_k: Positive
    op: Str
    shard: Str
    parts: Annotated[list[Part], Field(min_length=1)]
    record_bytes: Positive
    record_stride: Positive
    experts: Annotated[list[Record], Field(min_length=1)]


class Swappable(Schema):
    version: Literal[1]
    backbone_data: Str
    routers: Str
    segments: Annotated[list[Segment], Field(min_length=2)]
    moe: Annotated[list[MoEBlock], Field(min_length=1)]
    pools: dict[Str, list[Optional[list[Count]]]]
    model: Optional[ModelDims] = None  # the decoder dims (newer bundles); older ones have genai_config.json
    # per pool, per MoE block: the mean router probability over the union's experts of the pool's calibration
    # text, as the engine's chooser probes it (engine/swappable/chooser.py); absent when a pool's text was not at hand
    profiles: Optional[dict[Str, list[list[Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)]]]]] = None


class PoolRecord(Schema):
    """A pool a bundle was exported for (manifest 'pools'): its name and per-layer source expert ids."""
    name: Str
    method: Optional[Str] = None
    layers: Optional[list[Optional[list[Count]]]] = None  # absent for `--pools all`


class Manifest(Schema):
    schema_version: Literal[1]
    kind: Optional[Str] = None
    files: dict[Str, FileEntry]
    experts: list[LayerExperts] = []
    pools: list[PoolRecord] = []
    context_length: Optional[Positive] = None
    source: Optional[Source] = None
    swappable: Optional[Swappable] = None


# ---------------------------------------------------------------------------------------------------------
# prepared.json of the per-machine store (runtime/mapped.py)
# ---------------------------------------------------------------------------------------------------------
class Region(Schema):
    offset: Count
    length: Positive
    per_expert: Positive


class PreparedLayer(Schema):
    index: Count
    layer: Count
    model: Str
    data: Str
    fc1: Region
    fc2: Region
    sha256: list[Sha256]
    fixed_sha256: Sha256


class Prepared(Schema):
    version: Int
    signature: Str
    layers: list[PreparedLayer]


# ---------------------------------------------------------------------------------------------------------
# containment and coverage
# ---------------------------------------------------------------------------------------------------------
def bundle_file(root: Path, manifest: dict, name, where: str) -> Path:
    """The bundle file `name` (named by `where`, e.g. "genai_config.json: field 'model.decoder.filename'"),
    refused unless it is a plain relative name inside the bundle (symlinks resolved) listed in `files`."""
    path = confined(root, name, where, BundleError)
    if name not in manifest.get("files", {}):
        raise BundleError(f"{where}: {name!r} is not listed in {MANIFEST} 'files' (no sha256 covers it)")
    return path


def onnx_external_files(path: Path) -> list[str]:
    """Every external-data location the ONNX graph at `path` names (initializers, sparse initializers and
    attribute tensors, subgraphs included), without reading any data."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own types on a malformed graph
        raise BundleError(f"{path}: not a readable ONNX graph ({str(exc).splitlines()[0] if str(exc) else exc})") \
            from None
    tensors = list(_get_all_tensors(model))
    for g in [model.graph]:
        for sp in g.sparse_initializer:
            tensors += [sp.values, sp.indices]
    out = []
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc not in out:
                out.append(loc)
    return out


def check_graph_files(root: Path, manifest: dict, graph: Path) -> None:
    """The graph's external-data files are plain names inside the bundle and listed in `files`. onnxruntime
    resolves a location relative to the graph's own directory, so that is where it is looked up here too: a graph
    at sub/model.onnx naming model.onnx.data reads sub/model.onnx.data, which must itself be listed and hashed."""
    try:
        sub = Path(os.path.relpath(graph.parent, root))
    except ValueError:
        raise BundleError(f"{graph}: not inside the bundle {root}") from None
    for loc in onnx_external_files(graph):
        if not isinstance(loc, str) or not loc:
            raise BundleError(f"{graph}: external data of a tensor names no file")
        name = loc if sub == Path(".") else (sub / loc).as_posix()
        bundle_file(root, manifest, name, f"{graph}: external data of tensor ({loc!r}, resolved from the graph's "
                                          f"directory)")


def read_manifest(root: Path) -> dict:
    """manifest.json, parsed (bounded) and validated; returned as the plain dict the loaders index."""
    from ..schema import load_json

    path = root / MANIFEST
    data = load_json(path, BundleError, f"missing: {root} is not a bundle")
    if not isinstance(data, dict):
        raise BundleError(f"{path}: not a manifest (a JSON object expected)")
    if data.get("schema_version") != 1:
        raise BundleError(f"{path}: unsupported manifest (schema_version {data.get('schema_version')!r}, "
                          f"expected 1)")
    validate(data, Manifest, str(path), BundleError)
    return data


def read_model_dims(root: Path, manifest: dict, need_filename: bool) -> dict:
    """The decoder dims: the manifest's `swappable.model` when present, else genai_config.json's "model"
    (which must then be listed in `files`)."""
    sw = manifest.get("swappable") or {}
    if sw.get("model") is not None and not need_filename:
        return sw["model"]
    from ..schema import load_json

    name = "genai_config.json"
    path = bundle_file(root, manifest, name, f"{root / MANIFEST}: the decoder config") if manifest else root / name
    cfg = load_json(path, BundleError)
    validate(cfg, GenaiConfig, str(path), BundleError)
    return cfg["model"]


def check_shard_layout(where: str, moe: dict, shard_bytes: int) -> None:
    """Records of one MoE layer tile its shard: each record is `record_bytes` (the sum of its parts) followed by
    zero padding up to `record_stride`; the records' offsets are 0, stride, 2*stride, ... in some order, and the
    shard is exactly n * stride bytes. Then nothing in a shard escapes both the sha256 and the zero check."""
    import numpy as np

    for j, p in enumerate(moe["parts"]):
        want = int(np.prod(p["shape"], dtype=np.int64)) * np.dtype(p["dtype"]).itemsize
        if p["nbytes"] != want:
            raise BundleError(f"{where}.parts[{j}].nbytes': {p['nbytes']} != {p['shape']} x {p['dtype']} ({want})")
    total = sum(p["nbytes"] for p in moe["parts"])
    rb, stride, n = moe["record_bytes"], moe["record_stride"], len(moe["experts"])
    if rb != total:
        raise BundleError(f"{where}.record_bytes': {rb}, but its parts add up to {total}")
    if stride < rb:
        raise BundleError(f"{where}.record_stride': {stride} is below record_bytes {rb} (records would overlap)")
    seen: dict[int, int] = {}
    for e, rec in enumerate(moe["experts"]):
        off = rec["offset"]
        if off % stride or off // stride >= n:
            raise BundleError(f"{where}.experts[{e}].offset': {off} is not a record slot of the shard "
                              f"(multiples of {stride} below {n * stride})")
        if off in seen:
            raise BundleError(f"{where}.experts[{e}].offset': {off} overlaps experts[{seen[off]}]")
        seen[off] = e
    ids = [rec["source_id"] for rec in moe["experts"]]
    if len(set(ids)) != n:
        raise BundleError(f"{where}.experts': an expert's source_id appears twice")
    if shard_bytes != n * stride:
        raise BundleError(f"{where}.shard': {moe['shard']} has {shard_bytes} bytes, its {n} records of stride "
                          f"{stride} take {n * stride}")


def check_swappable(root: Path, manifest: dict, n_layers: int) -> None:
    """Everything a swappable manifest names is confined, covered, and consistent with the files: segment and
    template graphs (and their external data), routers, shards (record layout), the per-layer expert remap."""
    where = f"{root / MANIFEST}: field 'swappable"
    sw = manifest["swappable"]
    files = manifest["files"]
    for key in ("backbone_data", "routers"):
        if not bundle_file(root, manifest, sw[key], f"{where}.{key}'").is_file():
            raise BundleError(f"{root / sw[key]}: missing (named by {MANIFEST} 'swappable.{key}')")
    if len(sw["segments"]) != len(sw["moe"]) + 1:
        raise BundleError(f"{where}.segments': {len(sw['segments'])} segments for {len(sw['moe'])} MoE layers "
                          f"(expected one more)")
    for s, seg in enumerate(sw["segments"]):
        check_graph_files(root, manifest, bundle_file(root, manifest, seg["file"], f"{where}.segments[{s}].file'"))
    routers_bytes = files[sw["routers"]]["bytes"]
    layers_seen = set()
    for m, moe in enumerate(sw["moe"]):
        w = f"{where}.moe[{m}]"
        if moe["index"] != m:
            raise BundleError(f"{w}.index': {moe['index']}, expected {m}")
        layer = moe["layer"]
        if layer >= n_layers or layer in layers_seen:
            raise BundleError(f"{w}.layer': {layer} is not a distinct layer below {n_layers}")
        layers_seen.add(layer)
        remap = manifest.get("experts") or []
        if layer >= len(remap) or remap[layer]["layer"] != layer:
            raise BundleError(f"{root / MANIFEST}: field 'experts': no entry for MoE layer {layer}")
        check_graph_files(root, manifest, bundle_file(root, manifest, moe["template"], f"{w}.template'"))
        shard = bundle_file(root, manifest, moe["shard"], f"{w}.shard'")
        size = shard.stat().st_size if shard.is_file() else -1
        if size != files[moe["shard"]]["bytes"]:
            raise BundleError(f"{shard}: has {size if size >= 0 else 'no'} bytes, {MANIFEST} says "
                              f"{files[moe['shard']]['bytes']} (missing, truncated or replaced)")
        check_shard_layout(w, moe, size)
        r = moe["router"]
        if r["shape"][1] != len(moe["experts"]) or r["offset"] + r["shape"][0] * r["shape"][1] * 4 > routers_bytes:
            raise BundleError(f"{w}.router': shape {r['shape']} at offset {r['offset']} does not fit "
                              f"{sw['routers']} ({routers_bytes} bytes) or its {len(moe['experts'])} experts")
    for name, layers in sw["pools"].items():
        if len(layers) != n_layers:
            raise BundleError(f"{where}.pools.{name}': {len(layers)} layers, the model has {n_layers}")


def check_decoder_inputs(where: str, shapes: dict[str, list], dims: dict) -> None:
    """The graph's past_key_values inputs (name -> shape) are exactly layers 0..n-1 of the config's dims, with its KV
    heads and head size wherever the graph fixes them; `where` names the config's decoder section."""
    dec = dims["decoder"]
    n, heads, size = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
    past = {k for k in shapes if k.startswith("past_key_values.")}
    want = {f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")}
    if past != want:
        raise BundleError(f"{where}.num_hidden_layers': {n} does not match the graph's inputs "
                          f"({len(past)} past_key_values inputs)")
    for name in sorted(want):
        shape = list(shapes[name])
        if not shape:  # rank not recorded (older swappable segments): onnxruntime checks it when running
            continue
        if len(shape) != 4:
            raise BundleError(f"{where}': the graph's input {name} has shape {shape}, expected 4 dimensions")
        for field, dim, val in (("num_key_value_heads", 1, heads), ("head_size", 3, size)):
            if isinstance(shape[dim], int) and shape[dim] != val:
                raise BundleError(f"{where}.{field}': {val}, the graph's {name} has {shape[dim]}")


def check_template(where: str, moe: dict, template) -> None:
    """The MoE block template (onnx.ModelProto) takes `x`, gives `y`, and holds the router and every part as
    initializers of the manifest's shapes."""
    import numpy as np
    from onnx import helper

    if [i.name for i in template.graph.input] != [moe["x"]] or moe["y"] not in [o.name for o in template.graph.output]:
        raise BundleError(f"{where}.x'/'y': the template graph does not map {moe['x']!r} to {moe['y']!r}")
    inits = {t.name: t for t in template.graph.initializer}
    want = {moe["router_weight"]: (list(moe["router"]["shape"]), "float32")}
    want.update({p["name"]: ([len(moe["experts"]), *p["shape"]], p["dtype"]) for p in moe["parts"]})
    for name, (shape, dtype) in want.items():
        t = inits.get(name)
        try:
            got = None if t is None else np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name
        except (KeyError, TypeError):
            got = "unknown"
        if t is None or list(t.dims) != shape or got != dtype:
            raise BundleError(f"{where}': initializer {name!r} of the template is "
                              f"{'missing' if t is None else f'{list(t.dims)} {got}'}, the manifest says {shape} {dtype}")


def check_dataflow(where: str, segments: list, moe: list, n_layers: int) -> None:
    """Each segment's inputs are decoder inputs or outputs of what ran before it (segments, MoE blocks), and
    the last leaves the logits and every layer's present KV: the runtime's forward never misses a tensor.
    `segments`: [(manifest entry, onnxruntime session)]."""
    env = {"input_ids", "attention_mask", "position_ids"}
    env |= {f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")}
    for s, (seg, sess) in enumerate(segments):
        real_in = {i.name for i in sess.get_inputs()}
        real_out = {o.name for o in sess.get_outputs()}
        if set(seg["inputs"]) != real_in or not set(seg["outputs"]) <= real_out:
            raise BundleError(f"{where}.segments[{s}]': inputs/outputs differ from the graph of {seg['file']}")
        missing = [i for i in seg["inputs"] if i not in env]
        if missing:
            raise BundleError(f"{where}.segments[{s}].inputs': {missing[0]!r} is computed by nothing before it")
        env |= set(seg["outputs"])
        if s < len(moe):
            if moe[s]["x"] not in env:
                raise BundleError(f"{where}.moe[{s}].x': {moe[s]['x']!r} is computed by nothing before it")
            env.add(moe[s]["y"])
    need = ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    missing = [k for k in need if k not in env]
    if missing:
        raise BundleError(f"{where}.segments': no segment computes {missing[0]!r}")
