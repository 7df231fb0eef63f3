"""The mapped mechanism's prepared store: choosing the mechanism, writing the store (`prepare`: once per bundle,
onnxruntime version and CPU; again when stale or corrupted), validating prepared.json, and opening every layer's
union session from it (mapped.py holds the union graph and the per-layer page mechanics)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from ...errors import BudgetError, BundleError, EmoEdgeError
from .layers import MoELayer, _NoStore, _StaleStore, _StaleStoreError
from .mapped import PAGE, PREPARED_VERSION, cpu_signature, union_block
from ..memory import _mb, _trim, peak_rss, rss_now as rss
from ..ort_session import cpu_session


class PreparedStore:
    """SwappableEngine's part that opens (preparing or re-preparing it first) the mapped mechanism's store.

    Uses the runtime's root, layers, budget, _ort/_options, progress; sets each layer's mapped/session."""

    # ---- mechanism -----------------------------------------------------------------------------------------
    def _choose_mechanism(self, want: str) -> str:
        """'mapped' (union sessions over a prepared store, no rebuild on a swap) where every MoE block is a QMoE
        it reproduces exactly and the platform allows; 'rebuild' (per-pool sessions) otherwise (fp32 MoE)."""
        from . import mapped as mp

        if want not in ("auto", "mapped", "rebuild"):
            raise BundleError(f"swap mechanism '{want}': expected auto, mapped or rebuild")
        if want == "rebuild":
            return "rebuild"
        why = mp.supported() or next((f"layer {L.layer}: {r}" for L in self.layers
                                      if (r := mp.eligible(L.template, L.meta))), None)
        if why is None:
            return "mapped"
        if want == "mapped":
            raise BundleError(f"{self.root}: the mapped swap mechanism cannot serve this bundle ({why})")
        return "rebuild"

    def _open_mapped(self, progress=None, again: str | None = None) -> None:
        """Create every layer's union session from the prepared store (preparing it first if this machine has
        none, or again if it is stale or corrupted: `again` says why it is known to be), then drop every page
        that loading touched."""
        import shutil

        from ...fsutil import atomic_dir, dir_of
        from . import mapped as mp

        store = mp.store_dir(self.root)
        if again is not None:
            if progress:
                progress(f"prepared store {again}; preparing again")
            shutil.rmtree(store, ignore_errors=True)
        for attempt in (0, 1) if again is None else (1,):
            if not (store / "prepared.json").is_file():
                raw_layer = max(len(L.ids) * L.rec_bytes for L in self.layers)
                need = rss() + int(raw_layer * 2.3)
                if self.budget is not None and need > self.budget:
                    raise BudgetError(f"--budget {self.budget_text} ({_mb(self.budget)}): preparing this bundle for "
                                      f"this CPU (once, into {store}) needs about {_mb(need)}; run it once without "
                                      f"a budget or with a larger one")
                if progress:
                    progress(f"preparing the bundle for this CPU (once) into {store}")
                try:
                    ours = dir_of(mp.STORE_FILES)  # a store of ours is replaced; nothing else
                    with atomic_dir(store, force=True, replaces=ours, what="prepared store") as tmp:
                        prepare(self, tmp, progress)
                except OSError as exc:  # unwritable or full cache directory
                    raise _NoStore(f"{store}: cannot write the prepared store ({exc.strerror or exc})") from None
                except BundleError:  # the bundle itself (a shard failing its checks): not the store's fault
                    raise
                except EmoEdgeError as exc:  # fsutil: the store's directory cannot be made or written (full, ...)
                    if isinstance(exc, BudgetError):
                        raise
                    raise _NoStore(f"{store}: cannot write the prepared store ({exc})") from None
            try:
                self._load_mapped(store, self._read_prepared(store))
                return
            except _StaleStore as exc:
                for L in self.layers:
                    self._close_mapped(L)
                if attempt:
                    raise BundleError(f"{store}: prepared store rejected again after re-preparing ({exc})") from None
                if progress:
                    progress(f"prepared store is stale or corrupted ({exc}); preparing again")
                shutil.rmtree(store, ignore_errors=True)

    def _read_prepared(self, store: Path) -> dict:
        """prepared.json, validated against this bundle: anything wrong with it (our own file) means the store
        must be prepared again (_StaleStore), never a traceback."""
        from ...bundle.schema import Prepared
        from ...schema import confined, load_json, validate
        from . import mapped as mp

        path = store / "prepared.json"
        try:
            info = load_json(path, _StaleStoreError)
            validate(info, Prepared, str(path), _StaleStoreError)
            if info["version"] != mp.PREPARED_VERSION or len(info["layers"]) != len(self.layers):
                raise _StaleStoreError("version or layer count differs")
            for L, rec in zip(self.layers, info["layers"]):
                where = f"{path}: layer {L.layer}"
                data = confined(store, rec["data"], where, _StaleStoreError)
                confined(store, rec["model"], where, _StaleStoreError)
                size = data.stat().st_size if data.is_file() else -1
                for r in (rec["fc1"], rec["fc2"]):
                    if r["length"] != r["per_expert"] * len(L.ids) or r["offset"] + r["length"] > size:
                        raise _StaleStoreError(f"{where}: prepacked region {r} does not fit {rec['data']} "
                                               f"({size} bytes)")
                try:
                    fixed = fixed_sha256(store / rec["model"], data, _expert_names(L.meta))
                except Exception as exc:  # noqa: BLE001 - a damaged graph or data file of our own store
                    raise _StaleStoreError(f"{where}: {rec['model']} unreadable ({type(exc).__name__})") from None
                if fixed != rec["fixed_sha256"]:
                    raise _StaleStoreError(f"{where}: {rec['model']} or its router weights fail their sha256 check")
        except _StaleStoreError as exc:
            raise _StaleStore(str(exc)) from None
        return info

    def _load_mapped(self, store: Path, info: dict) -> None:
        from . import mapped as mp

        recs = info.get("layers") if isinstance(info, dict) else None
        if info.get("version") != mp.PREPARED_VERSION or not isinstance(recs, list) or len(recs) != len(self.layers):
            raise _StaleStore("version or layer count differs")
        for L, rec in zip(self.layers, recs):
            if rec.get("index") != L.index or len(rec.get("sha256", [])) != len(L.ids):
                raise _StaleStore(f"layer {L.layer} differs")
            data = store / rec["data"]
            if self.budget is not None:
                need = rss() + len(L.ids) * L.rec_bytes + rec["fc1"]["length"] + rec["fc2"]["length"]
                if need > self.budget:
                    raise BudgetError(f"--budget {self.budget_text} ({_mb(self.budget)}) is below what opening "
                                      f"layer {L.layer} takes ({_mb(need)}: onnxruntime validates the union's "
                                      f"prepacked experts once at load)")
            try:  # (VmHWM is never reset here: /usr/bin/time's peak must stay truthful)
                sess = cpu_session(str(store / rec["model"]), self._options(arena=False))
            except Exception as exc:  # onnxruntime raises its own types; the store is ours: prepare it again
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise _StaleStore(f"{store / rec['model']}: {msg}") from None
            self.startup_peak = max(self.startup_peak, peak_rss())
            ml = mp.MappedLayer(sess, data, os.open(data, os.O_RDONLY), len(L.ids), rec["fc1"], rec["fc2"],
                                rec["sha256"])
            L.mapped, L.session = ml, sess
            try:
                ml.refresh_maps()
            except BundleError as exc:
                raise _StaleStore(str(exc)) from None
            if mp.anonymous_kb(data):
                raise BundleError(f"{data}: onnxruntime modified its mapping of the prepared weights; use "
                                  f"EMO_EDGE_SWAP=rebuild")
            ml.drop_all()
            _trim()

    def _close_mapped(self, L: MoELayer) -> None:
        if L.mapped is not None:
            L.session = None
            try:
                os.close(L.mapped.fd)
            except OSError:
                pass
            L.mapped = None
            L.pool_idx = L.mask = None
            L.active = ()

    def _reprepare(self, why: str) -> None:
        """An expert of the prepared store failed its sha256 check: prepare the store again (once per runtime)
        and reopen every layer from it. If that fails, the old sessions stay as they were and `why` is raised."""
        self._reprepared = True
        old = [(L.mapped, L.session, L.pool_idx, L.mask, L.active) for L in self.layers]
        for L in self.layers:
            L.mapped = L.session = L.pool_idx = L.mask = None
            L.active = ()
        try:
            self._open_mapped(self.progress, again=f"is corrupted ({why.split('; swap refused')[0]})")
        except (EmoEdgeError, _NoStore) as exc:
            for L, (ml, sess, idx, mask, act) in zip(self.layers, old):
                self._close_mapped(L)
                L.mapped, L.session, L.pool_idx, L.mask, L.active = ml, sess, idx, mask, act
            raise BundleError(f"{why} (preparing the store again failed: {exc})") from None
        for ml, *_ in old:
            try:
                os.close(ml.fd)
            except OSError:
                pass
        self.lru.clear()
        self.active_name = None


# ---------------------------------------------------------------------------------------------------------
# writing the store (once per bundle, onnxruntime version and CPU)
# ---------------------------------------------------------------------------------------------------------
_PREPACKED = re.compile(r"^[^|]+\|(\d+);(\d+);\d+(\|.*)?$")


def _packed_region(t, n_experts: int) -> dict | None:
    """{offset, length, per_expert} of an initializer's first prepacked buffer in its external data file."""
    d = {e.key: e.value for e in t.external_data}
    pp = next((v for k, v in d.items() if k.startswith("prepacked")), None)
    if pp is None:
        return None
    m = _PREPACKED.match(pp)
    if not m:
        return None
    off, length = int(m.group(1)), int(m.group(2))
    if length % n_experts:
        return None
    return {"offset": off, "length": length, "per_expert": length // n_experts}


def _write_union_data(rt, L, path: Path) -> dict:
    """Stream layer L's expert records from its shard into `path` laid out per part ([n, ...] contiguous, as the
    union block's initializers), verifying each record's sha256; returns name -> external TensorProto."""
    from onnx import TensorProto, helper

    n, parts = len(L.ids), L.meta["parts"]
    bases, off = [], 0
    for p in parts:
        off = -(-off // PAGE) * PAGE
        bases.append(off)
        off += n * p["nbytes"]
    slot = np.empty(L.meta["record_stride"], np.uint8)  # the record, then its padding (must be zero)
    buf, pad = slot[:L.rec_bytes], slot[L.rec_bytes:]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, off)
        for e, meta in enumerate(L.meta["experts"]):
            got = os.preadv(L.fd, [slot.data], meta["offset"])
            if got != slot.nbytes:
                raise BundleError(f"{rt.root / L.meta['shard']}: expert {meta['source_id']} of layer {L.layer} is "
                                  f"truncated (read {got} of {slot.nbytes} bytes)")
            if hashlib.sha256(buf).hexdigest() != meta["sha256"]:
                raise BundleError(f"{rt.root / L.meta['shard']}: expert {meta['source_id']} of layer {L.layer} "
                                  f"fails its sha256 check (corrupted shard)")
            if pad.any():
                raise BundleError(f"{rt.root / L.meta['shard']}: the padding after expert {meta['source_id']} of "
                                  f"layer {L.layer} is not zero (corrupted shard)")
            a = 0
            for p, base in zip(parts, bases):
                os.pwrite(fd, buf[a:a + p["nbytes"]], base + e * p["nbytes"])
                a += p["nbytes"]
    finally:
        os.close(fd)
    protos = {}
    for p, base in zip(parts, bases):
        t = TensorProto()
        t.name = p["name"]
        t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(p["dtype"]))
        t.dims.extend([n, *p["shape"]])
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", path.name), ("offset", str(base)), ("length", str(n * p["nbytes"]))):
            ent = t.external_data.add()
            ent.key, ent.value = k, v
        protos[p["name"]] = t
    return protos


def prepare(rt, dest: Path, progress=None) -> dict:
    """Write the prepared store for runtime `rt` (a SwappableEngine) into `dest` (an empty directory)."""
    import onnx
    import onnxruntime as ort

    layers = []
    for L in rt.layers:
        t0 = time.perf_counter()
        src = dest / f".moe{L.index}.src.onnx"
        arrays = {L.meta["router_weight"]: np.ascontiguousarray(L.router)}
        arrays.update(_write_union_data(rt, L, dest / (src.name + ".data")))  # one record in memory at a time
        model = union_block(L.template, L.meta, arrays)
        onnx.save(model, str(src))
        del model, arrays
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.optimized_model_filepath = str(dest / f"moe{L.index}.onnx")
        so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"moe{L.index}.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            sess = cpu_session(str(src), so)
        except Exception as exc:  # onnxruntime raises its own types
            raise BundleError(f"layer {L.layer}: onnxruntime cannot prepare the union block "
                              f"({str(exc).splitlines()[0]})") from None
        del sess
        src.unlink()
        (dest / (src.name + ".data")).unlink()
        saved = onnx.load(str(dest / f"moe{L.index}.onnx"), load_external_data=False)
        n = len(L.ids)
        regions = {}
        for t in saved.graph.initializer:
            if t.name in (L.meta["parts"][0]["name"], L.meta["parts"][2]["name"] if len(L.meta["parts"]) > 2 else ""):
                r = _packed_region(t, n)
                if r is None:
                    raise BundleError(f"layer {L.layer}: onnxruntime saved no per-expert prepacked weights for "
                                      f"{t.name}")
                regions[t.name] = r
        if len(regions) != 2:
            raise BundleError(f"layer {L.layer}: expected prepacked fc1 and fc2 weights, found {sorted(regions)}")
        fc1, fc2 = (regions[L.meta["parts"][0]["name"]], regions[L.meta["parts"][2]["name"]])
        data = dest / f"moe{L.index}.data"
        shas = []
        with open(data, "rb") as f:
            for e in range(n):
                h = hashlib.sha256()
                for r in (fc1, fc2):
                    f.seek(r["offset"] + e * r["per_expert"])
                    h.update(f.read(r["per_expert"]))
                shas.append(h.hexdigest())
        layers.append({"index": L.index, "layer": L.layer, "model": f"moe{L.index}.onnx", "data": data.name,
                       "fc1": fc1, "fc2": fc2, "sha256": shas,
                       "fixed_sha256": fixed_sha256(dest / f"moe{L.index}.onnx", data, _expert_names(L.meta))})
        if progress:
            progress(f"prepared layer {L.layer}: {n} experts in {time.perf_counter() - t0:.1f} s")
    info = {"version": PREPARED_VERSION, "signature": cpu_signature(), "layers": layers}
    (dest / "prepared.json").write_text(json.dumps(info, indent=1))
    return info


def _expert_names(meta: dict) -> set:
    return {p["name"] for p in meta["parts"]}


def fixed_sha256(model: Path, data: Path, experts: set) -> str:
    """sha256 of what a layer's union session uses besides the experts: the graph file and every byte range of
    its data file that a non-expert initializer (the router, constants) names, raw and prepacked. The experts'
    prepacked bytes are checked per expert at each load (MappedLayer.load) and onnxruntime validates them against
    the raw ones when the session is created; this covers the rest (a corrupted router otherwise changes the
    routing silently). Small: the router is [hidden, experts] float32."""
    import onnx

    raw = model.read_bytes()
    h = hashlib.sha256(raw)
    graph = onnx.ModelProto()
    graph.ParseFromString(raw)  # the graph only: no external data is loaded
    with open(data, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for t in graph.graph.initializer:
            if t.name in experts:
                continue
            ext = {e.key: e.value for e in t.external_data}
            spans = [(int(ext["offset"]), int(ext["length"]))] if "offset" in ext and "length" in ext else []
            for k, v in ext.items():
                if k.startswith("prepacked"):
                    spans += [(int(a), int(b)) for a, b, *_ in (seg.split(";") for seg in v.split("|")[1:])]
            for off, length in spans:
                f.seek(off)
                h.update(f.read(max(0, min(length, size - off))))  # out of range: short, so it mismatches
    return h.hexdigest()
