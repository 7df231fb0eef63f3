"""Swappable bundles: graph surgery on a static export of the union of the pools.

`export --pools math,code,prose,chat --swappable` runs the static pipeline for the UNION of the pools (so every
byte of every tensor is exactly what a static export of any one pool holds), then rewrites it:

    static union graph                       swappable bundle (flat directory)
    ------------------                       ---------------------------------
    embed, layers' attention, norms,   -->   seg{s}.onnx  (s = 0..M, M = number of MoE layers): the backbone cut
    shared experts, lm_head                  at each routed-MoE block; weights in backbone.data
    layer i: router MatMul (+Softmax)  -->   moe{m}.onnx: the block alone (router MatMul, Softmax, QMoE|MoE) with
             + QMoE (routed experts)         placeholder initializers: the runtime turns it into one union session
                                             per layer over a per-machine prepacked store (QMoE, "mapped" swaps)
                                             or one session per active pool (fp32 MoE, "rebuild" swaps)
    QMoE expert tensors of the union   -->   experts.l{i}.bin: one record per expert (all its fc1/fc2 weights,
                                             scales, zero points back to back), 4 KB aligned, sha256 per record
    router rows of the union           -->   routers.bin: float32 [H, r_union] per layer (the runtime keeps them
                                             resident for `auto` pool choice)

Why not expert weights as graph inputs bound with IOBinding: measured on onnxruntime 1.32 CPU, a QMoE whose weights
are graph inputs takes the non-prepacked path: 6x slower per call and numerically different from the static
bundle (max diff 6e-3). Only initializers get QMoE's prepacked int8-activation kernels; see emo_edge/engine/swappable/ for
how swaps keep them (mapped.py: prepacked weights memory-mapped, a swap moves pages and a routing mask).

The manifest keeps the static fields (source, pools, precision, experts remap of the union) and adds
`"swappable"`: segments and their I/O, per MoE layer the block's template, part layout, and every expert's record
(offset, bytes, sha256), the catalog pools (per-layer source ids) the bundle was exported for, and `model`: the
decoder dims (genai_config.json's "model" section; the bundle ships no genai_config.json, having no model.onnx).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from emo_edge.errors import BundleError, EmoEdgeError

SWAP_VERSION = 1
RECORD_ALIGN = 4096
DATA_ALIGN = 64
BACKBONE_DATA = "backbone.data"
ROUTERS = "routers.bin"


def shard_name(layer: int) -> str:
    return f"experts.l{layer}.bin"


# ---------------------------------------------------------------------------------------------------------
# graph analysis
# ---------------------------------------------------------------------------------------------------------
def _ext_info(t: TensorProto) -> tuple[str, int, int] | None:
    if t.data_location != TensorProto.EXTERNAL:
        return None
    d = {e.key: e.value for e in t.external_data}
    return d["location"], int(d.get("offset", 0)), int(d.get("length", 0))


def _dtype_of(t: TensorProto) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))


def find_moe_blocks(graph: onnx.GraphProto) -> list[dict]:
    """Per MoE layer: the block's nodes (router MatMul, router Softmax, Casts, QMoE|MoE), its input and output,
    the router weight and the expert tensors, in graph order."""
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    blocks = []
    for node in graph.node:
        if node.op_type not in ("QMoE", "MoE") or not node.name.startswith("/model/layers."):
            continue
        prefix = node.name.rsplit("/", 1)[0]  # /model/layers.{i}/moe
        layer = int(prefix.split("/")[2].split(".")[1])
        block = [n for n in graph.node if n.name.startswith(f"{prefix}/router/")]
        names = {n.name for n in block}
        if any(n.op_type not in ("MatMul", "Softmax") for n in block) or not block:
            raise BundleError(f"layer {layer}: routing variant not supported by --swappable "
                              f"(router nodes {sorted(n.op_type for n in block)})")
        mm = next(n for n in block if n.op_type == "MatMul")
        router_w = mm.input[1]
        if router_w not in inits:
            raise BundleError(f"layer {layer}: router weight {router_w} is not an initializer")
        experts = []
        for slot, name in enumerate(node.input):
            if slot < 2 or not name:
                continue
            if name in inits:
                experts.append((slot, name, name))
                continue
            p = producers.get(name)
            if p is not None and p.op_type == "Cast" and p.input[0] in inits:
                block.append(p)
                experts.append((slot, name, p.input[0]))
                continue
            if p is not None and p.name in names:
                continue  # router weights
            raise BundleError(f"layer {layer}: expert input {name} of {node.name} is neither an initializer nor a Cast")
        block.append(node)
        blocks.append({"layer": layer, "prefix": prefix, "nodes": block, "node": node, "x": node.input[0],
                       "y": node.output[0], "router_weight": router_w, "expert_inits": [e[2] for e in experts]})
    if not blocks:
        raise BundleError("the union export has no routed MoE layers; nothing to make swappable")
    return blocks


_FLOAT = TensorProto.FLOAT


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every tensor (enough rules for the exporter's ops; FLOAT otherwise)."""
    types: dict[str, int] = {}
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        types[v.name] = v.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type
    same_as_input = {"ReduceSum", "Sub", "Add", "Mul", "Reshape", "Concat", "Slice", "Unsqueeze", "Squeeze",
                     "Transpose", "Expand", "Neg", "Split", "Div"}
    for n in graph.node:
        attrs = {a.name: a for a in n.attribute}
        for o in n.output:
            if not o or o in types:
                continue
            if n.op_type == "Cast":
                types[o] = attrs["to"].i
            elif n.op_type == "Shape":
                types[o] = TensorProto.INT64
            elif n.op_type == "Gather" and n.input[0] in types:
                types[o] = types[n.input[0]]
            elif n.op_type in same_as_input and n.input[0] in types:
                types[o] = types[n.input[0]]
            else:
                types[o] = _FLOAT
    return types


def partition(graph: onnx.GraphProto, blocks: list[dict]) -> list[dict]:
    """Cut the backbone at the MoE blocks: stage(node) = 1 + index of the latest MoE block it depends on."""
    in_block = {n.name: m for m, b in enumerate(blocks) for n in b["nodes"]}
    stage_of_tensor: dict[str, int] = {}
    node_stage: dict[str, int] = {}
    for n in graph.node:
        if n.name in in_block:
            m = in_block[n.name]
            if n is blocks[m]["node"] or n.name == blocks[m]["node"].name:
                stage_of_tensor[n.output[0]] = m + 1
            else:
                for o in n.output:
                    stage_of_tensor[o] = m + 1  # internal to the block
            continue
        s = max([stage_of_tensor.get(i, 0) for i in n.input if i] or [0])
        node_stage[n.name] = s
        for o in n.output:
            if o:
                stage_of_tensor[o] = s
    n_seg = len(blocks) + 1
    inits = {t.name for t in graph.initializer}
    graph_inputs = [i.name for i in graph.input]
    graph_outputs = [o.name for o in graph.output]
    segs = [{"nodes": [], "inputs": [], "outputs": [], "inits": []} for _ in range(n_seg)]
    for n in graph.node:
        if n.name in node_stage:
            segs[node_stage[n.name]]["nodes"].append(n)
    # consumers: (segment or block) -> tensors needed
    consumers: dict[str, set] = {}
    for s, seg in enumerate(segs):
        for n in seg["nodes"]:
            for i in n.input:
                if i:
                    consumers.setdefault(i, set()).add(("seg", s))
    for m, b in enumerate(blocks):
        consumers.setdefault(b["x"], set()).add(("moe", m))
        if stage_of_tensor.get(b["x"]) != m:
            raise BundleError(f"layer {b['layer']}: MoE input is computed after an earlier MoE block; cannot cut")
    for s, seg in enumerate(segs):
        produced = {o for n in seg["nodes"] for o in n.output if o}
        needed = []
        for n in seg["nodes"]:
            for i in n.input:
                if i and i not in produced and i not in needed:
                    needed.append(i)
        seg["inits"] = [i for i in needed if i in inits]
        seg["inputs"] = [i for i in needed if i not in inits]
        outs = []
        for t in sorted(produced, key=lambda x: (x not in graph_outputs, x)):
            users = consumers.get(t, set())
            if t in graph_outputs or any(u != ("seg", s) for u in users):
                outs.append(t)
        seg["outputs"] = outs
    for s, seg in enumerate(segs):
        for i in seg["inputs"]:
            if i not in graph_inputs and stage_of_tensor.get(i) is None:
                raise BundleError(f"segment {s}: input {i} has no producer")
    return segs


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------
class _DataWriter:
    def __init__(self, path: Path):
        self.path, self.f, self.offset = path, open(path, "wb"), 0
        self.placed: dict[str, tuple[int, int]] = {}

    def put(self, name: str, data: memoryview | bytes) -> tuple[int, int]:
        if name in self.placed:
            return self.placed[name]
        pad = (-self.offset) % DATA_ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        mv = memoryview(data).cast("B")
        for a in range(0, len(mv), 1 << 24):
            self.f.write(mv[a:a + (1 << 24)])
        self.offset += len(mv)
        self.placed[name] = (start, len(mv))
        return self.placed[name]

    def close(self):
        self.f.flush()
        self.f.close()


def _ext_proto(t: TensorProto, location: str, offset: int, length: int) -> TensorProto:
    out = TensorProto()
    out.name, out.data_type = t.name, t.data_type
    out.dims.extend(t.dims)
    out.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = out.external_data.add()
        e.key, e.value = k, v
    return out


def _value_info(name: str, types: dict[str, int]):
    return helper.make_tensor_value_info(name, types.get(name, _FLOAT), None)


def _model(graph, src: onnx.ModelProto) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=list(src.opset_import), producer_name="emo-edge swappable")
    m.ir_version = src.ir_version
    return m


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(memoryview(p).cast("B"))
    return h.hexdigest()


def make_swappable(static_dir: Path, dst: Path, pools: dict[str, list], progress=None) -> dict:
    """Rewrite the static union bundle in `static_dir` into a swappable bundle in `dst` (an empty directory).
    `pools`: catalog name -> per-layer routed source ids (None for dense layers). Returns the "swappable"
    manifest section (without the file hashes of the static manifest)."""
    static_dir, dst = Path(static_dir), Path(dst)
    manifest = json.loads((static_dir / "manifest.json").read_text())
    model = onnx.load(str(static_dir / "model.onnx"), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    data = np.memmap(static_dir / "model.onnx.data", dtype=np.uint8, mode="r")

    def raw(t: TensorProto) -> np.ndarray:
        ext = _ext_info(t)
        if ext is None:
            return onnx.numpy_helper.to_array(t)
        _, off, length = ext
        return data[off:off + length].view(_dtype_of(t)).reshape(tuple(t.dims))

    blocks = find_moe_blocks(graph)
    segs = partition(graph, blocks)
    types = _elem_types(graph)
    graph_in = {v.name: v for v in graph.input}
    remap = {rec["layer"]: rec for rec in manifest["experts"]}
    for name, layers in pools.items():
        for rec in manifest["experts"]:
            if rec["routing"] == "dense":
                continue
            want = layers[rec["layer"]]
            if want is not None and not set(want) <= set(rec["routed_source_ids"]):
                raise EmoEdgeError(f"pool '{name}' layer {rec['layer']} uses experts outside the exported union")

    # ---- backbone segments -------------------------------------------------------------------------------
    bw = _DataWriter(dst / BACKBONE_DATA)
    seg_meta = []
    try:
        for s, seg in enumerate(segs):
            protos = []
            for name in seg["inits"]:
                t = inits[name]
                if _ext_info(t) is None:
                    protos.append(t)
                    continue
                off, length = bw.put(name, raw(t).reshape(-1).view(np.uint8))
                protos.append(_ext_proto(t, BACKBONE_DATA, off, length))
            # graph inputs keep their declared shapes: the runtime checks the KV dims against them
            g = helper.make_graph(seg["nodes"], f"emo_segment_{s}",
                                  [graph_in.get(i) or _value_info(i, types) for i in seg["inputs"]],
                                  [_value_info(o, types) for o in seg["outputs"]], protos)
            fname = f"seg{s}.onnx"
            onnx.save(_model(g, model), str(dst / fname))
            seg_meta.append({"file": fname, "inputs": seg["inputs"], "outputs": seg["outputs"]})
            if progress:
                progress(f"segment {s}")
    finally:
        bw.close()

    # ---- routers and expert shards ----------------------------------------------------------------------------
    moe_meta = []
    rf = open(dst / ROUTERS, "wb")
    r_off = 0
    try:
        for m, b in enumerate(blocks):
            layer = b["layer"]
            rec = remap[layer]
            ids = list(rec["routed_source_ids"])
            rw = raw(inits[b["router_weight"]])  # [H, r]
            if rw.shape[1] != len(ids):
                raise BundleError(f"layer {layer}: router has {rw.shape[1]} rows, the manifest lists {len(ids)} experts")
            rb = np.ascontiguousarray(rw, dtype=np.float32)
            rf.write(rb.tobytes())
            router = {"offset": r_off, "shape": list(rb.shape), "dtype": "float32"}
            r_off += rb.nbytes
            parts = []
            arrays = []
            for name in b["expert_inits"]:
                a = raw(inits[name])
                if a.shape[0] != len(ids):
                    raise BundleError(f"layer {layer}: {name} has {a.shape[0]} experts, expected {len(ids)}")
                arrays.append(a)
                per = int(np.prod(a.shape[1:])) * a.dtype.itemsize
                parts.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape[1:]), "nbytes": per})
            rec_bytes = sum(p["nbytes"] for p in parts)
            stride = -(-rec_bytes // RECORD_ALIGN) * RECORD_ALIGN
            experts = []
            with open(dst / shard_name(layer), "wb") as f:
                for e, src in enumerate(ids):
                    chunks = [np.ascontiguousarray(a[e]).reshape(-1).view(np.uint8) for a in arrays]
                    experts.append({"source_id": int(src), "offset": e * stride, "sha256": _sha(*chunks)})
                    for c in chunks:
                        f.write(c.data)
                    pad = stride - rec_bytes
                    if pad:
                        f.write(b"\0" * pad)
            # the block as a template graph: weights are placeholders (external refs into the shard, never read)
            tmpl_inits = [_ext_proto(inits[b["router_weight"]], shard_name(layer), 0, 0)]
            tmpl_inits += [_ext_proto(inits[name], shard_name(layer), 0, 0) for name in b["expert_inits"]]
            g = helper.make_graph(b["nodes"], f"emo_moe_{layer}", [_value_info(b["x"], types)],
                                  [_value_info(b["y"], types)], tmpl_inits)
            fname = f"moe{m}.onnx"
            onnx.save(_model(g, model), str(dst / fname))
            moe_meta.append({"layer": layer, "index": m, "template": fname, "x": b["x"], "y": b["y"],
                             "router_weight": b["router_weight"], "router": router, "routing": rec["routing"],
                             "routed_k": rec["routed_k"], "op": b["node"].op_type, "shard": shard_name(layer),
                             "parts": parts, "record_bytes": rec_bytes, "record_stride": stride,
                             "experts": experts})
            if progress:
                progress(f"experts layer {layer}")
    finally:
        rf.close()
    del data
    return {"version": SWAP_VERSION, "backbone_data": BACKBONE_DATA, "routers": ROUTERS, "segments": seg_meta,
            "moe": moe_meta, "pools": pools,
            "graph_inputs": [i.name for i in graph.input], "graph_outputs": [o.name for o in graph.output]}


# ---------------------------------------------------------------------------------------------------------
# the export entry point (hook for `emo-edge export --swappable`)
# ---------------------------------------------------------------------------------------------------------
PROFILE_DOCS, PROFILE_TOKENS = 8, 64  # calibration documents per pool, tokens of each, for its router profile


def pool_profiles(bundle: Path, pools) -> dict[str, list[list[float]]] | None:
    """Per pool, its calibration text's router profile as the bundle's chooser probes it (engine/swappable/
    chooser.py `closest_profile`), from the first PROFILE_DOCS documents (PROFILE_TOKENS tokens each) of each file
    the pool was discovered from. The text must be at hand and unchanged: the built-in calibration files, matched
    by name and sha256 (a pool's provenance names its files, never a path to follow). None unless every pool has
    one (the chooser compares pools on one footing)."""
    from emo_edge.engine.swappable import SwappableEngine
    from emo_edge.pools.calib import load_calibration
    from emo_edge.pools.catalog import BUILTIN_CALIB

    sources = {}
    for p in pools:
        files = (p.calibration or {}).get("files") or []
        names = [str(f.get("name", "")) for f in files]
        if not names or any(Path(n).name != n or n in ("", ".", "..") for n in names):
            return None  # a bare file name of ours, or nothing: never a path out of BUILTIN_CALIB
        paths = [BUILTIN_CALIB / n for n in names]
        if not all(path.is_file() for path in paths):
            return None
        sources[p.name] = (paths, [f.get("sha256") for f in files])
    with SwappableEngine(bundle, mechanism="rebuild", check_backbone=False) as eng:
        out = {}
        for name, (paths, sha) in sources.items():
            cal = load_calibration(paths, eng.tokenizer, max_tokens=PROFILE_TOKENS, max_docs=PROFILE_DOCS)
            if [f.sha256 for f in cal.files] != sha:
                return None
            out[name] = [[round(float(x), 6) for x in v] for v in eng.router_profile(cal.docs)]
        return out


def export_swappable(model: Path, pools: str, budget: str | None, context: int, target: str, precision: str,
                     out: Path | None, force: bool, verify: bool, progress: bool = True, n_verify: int = 4,
                     optimize: str = "balanced") -> dict:
    """Static export of the union of `pools`, then surgery into a swappable bundle at `out`. `budget` is not
    applied to the union (the runtime enforces its own budget); it is recorded. Returns the static report plus
    a "swappable" summary."""
    from emo_edge.model.checkpoint import CheckpointView
    from emo_edge.export import bundle_writer, pipeline
    from emo_edge.fsutil import atomic_dir, check_target, scratch

    model = Path(model)
    if out is not None:  # fail before any work; checked again at the rename
        check_target(out, force)
    view = CheckpointView(model)
    spec = view.spec
    names = [n.strip() for n in pools.split(",") if n.strip()]
    if not names or names == ["all"]:
        raise EmoEdgeError("--swappable needs named pools (e.g. --pools math,code,prose,chat)")
    from emo_edge.pools import resolve_pools
    resolved = resolve_pools(view, names)
    catalog = {}
    for p in resolved:
        catalog[p.name] = [None if layer.num_experts == 0 else
                           (sorted(set(e) - set(layer.implicit_experts)) if e is not None else list(layer.routed_experts))
                           for layer, e in zip(spec.layers, p.layers)]
    out = check_target(out if out is not None else pipeline.default_out(model, pools, precision + "-swappable"), force)
    with scratch(out, BundleError) as work:  # the union's static bundle lives in our marked scratch dir, removed on any exit
        tmp_static = work / "union-static"
        report = pipeline.export(model, pools, None, context, target, precision, tmp_static, False, verify,
                                 progress, n_verify, optimize=optimize, fold_shared=False)
        with atomic_dir(out, force, error=BundleError) as tmp:
            section = make_swappable(tmp_static, tmp, catalog)
            # no genai_config.json / config.json here: both name model.onnx, which a swappable bundle does not
            # have (onnxruntime-genai and optimum would fail on it); its decoder dims are the manifest's
            # swappable.model, exactly genai_config.json's "model" section
            section["model"] = json.loads((tmp_static / "genai_config.json").read_text())["model"]
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (tmp_static / name).is_file():
                    shutil.copyfile(tmp_static / name, tmp / name)
            report = dict(report, path=str(out), name=out.name)  # the bundle's own, not the union's scratch path
            bundle_writer.write_json(tmp / "report.json", report)
            (tmp / "report.md").write_text(bundle_writer.report_md(report), encoding="utf-8")
            static_m = json.loads((tmp_static / "manifest.json").read_text())
            body = {k: v for k, v in static_m.items() if k not in ("files", "schema_version", "emo_edge_version")}
            body["kind"] = "swappable"
            body["budget"] = budget
            body["swappable"] = section
            bundle_writer.write_manifest(tmp, body)
            profiles = pool_profiles(tmp, resolved)
            if profiles is not None:  # the chooser's reference points, probed on the bundle itself
                section["profiles"] = profiles
                bundle_writer.write_manifest(tmp, body)
    union = [len(m["experts"]) for m in section["moe"]]
    report["swappable"] = {"out": str(out), "union_experts_per_layer": union,
                           "pools": {k: [None if v is None else len(v) for v in layers] for k, layers in catalog.items()},
                           "shard_bytes": sum((out / m["shard"]).stat().st_size for m in section["moe"]),
                           "backbone_bytes": (out / BACKBONE_DATA).stat().st_size}
    return report
