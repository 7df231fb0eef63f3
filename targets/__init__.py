"""Deployment targets as data: what a target's onnxruntime build can run, and how we verify it.

Each `targets/<name>.json` describes one target. Exporters and the planner ask a `Target` for capabilities
(`supports(op)`, `precisions_for(component)`, `layout(component)`, `accuracy_level`, `overhead_bytes(...)`,
`kv_cache_dtype`, `speed`, ...); they never branch on `target.name`. Keys starting with "_" in the JSON files are
comments.

Quantization layout: `block_size`, `symmetric` and `scale_dtype` at the top level are the default layout of every
int8/int4 component; `layouts` overrides them per component (attention, experts, embedding, lm_head). A float16
scale is only accepted for the components whose operator takes scales of another type than its fp32 activations
(`FP16_SCALE_COMPONENTS`: QMoE and GatherBlockQuantized; MatMulNBits binds its scales to the activation type, so
the MatMulNBits parts -- attention, lm_head, and the shared/dense expert MLPs -- keep float32 scales).

Registry: `TARGETS` maps name -> Target (every *.json in this directory); `get_target(name)` raises an
`EmoEdgeError` listing the known names for an unknown one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from emo_edge.errors import EmoEdgeError
from emo_edge.schema import Count, Positive, Schema, Str, load_json, validate

PRECISIONS = ("fp32", "fp16", "int8", "int4")
COMPONENTS = ("attention", "experts", "embedding", "lm_head")
VERIFY_METRICS = ("top1_agreement", "kl", "ppl_ratio")
DEFAULT_TARGET = "cpu"
_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Overhead:
    """Runtime memory beyond resident weight bytes and the KV cache, as a formula fitted to measurements:
        base + weight_fraction * weight_bytes + prefill_tokens * per_token_per_hidden * hidden + vocab * 4
    (a prefill chunk's activations; its logits are the last token's only, [1, vocab] fp32: the graph's
    logits_to_keep input)."""

    base_bytes: int
    weight_fraction: float
    per_token_per_hidden: int
    prefill_tokens: int
    measured: str = ""

    def bytes(self, weight_bytes: int, vocab: int, hidden: int) -> int:
        per_token = self.per_token_per_hidden * hidden
        return int(self.base_bytes + self.weight_fraction * weight_bytes + self.prefill_tokens * per_token
                   + vocab * 4)


# Components whose onnxruntime operator accepts float16 block scales with float32 activations (op schemas of
# onnxruntime 1.32, checked by tests/export/test_quant.py): QMoE (scales T2, independent of the input T) for the routed
# experts, GatherBlockQuantized (scales T2 = its output type; the exporter casts the gathered rows to float32) for
# the embedding. MatMulNBits (attention, lm_head, shared/dense expert MLPs) needs scales of the activation type.
FP16_SCALE_COMPONENTS = ("experts", "embedding")
KV_BYTES = {"float32": 4, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class Layout:
    """How one quantized component is blocked: block size along K, symmetric (no zero points), scale dtype, and
    how symmetric scales are chosen (`quant.QuantScheme.rounding`: "search" unless a target says "absmax")."""

    block_size: int
    symmetric: bool
    scale_dtype: str
    rounding: str = "search"

    @property
    def scale_bytes(self) -> int:
        return {"float32": 4, "float16": 2}[self.scale_dtype]

    def to_dict(self) -> dict:
        return {"block_size": self.block_size, "symmetric": self.symmetric, "scale_dtype": self.scale_dtype,
                "rounding": self.rounding}


@dataclass(frozen=True)
class Speed:
    """The planner's decode-speed model (emo_edge/plan/sizing.py decode_estimate): seconds per token = layers *
    layer_s + per kernel class (fp32, int8, int4) the bytes it reads per token from memory / bandwidth[class],
    where a share cache_bytes / resident weights of the reads hits the last-level cache; the KV cache is read at
    `context_tokens` of context. The default `auto` (balanced) takes the most accurate fitting plan whose
    estimate is at least `balanced_fraction` of the fastest fitting plan's (same experts) or at least
    `enough_tok_s` (where decode outruns any reader, accuracy alone decides)."""

    bandwidth: dict  # kernel class (fp32 | int8 | int4) -> effective bytes/s
    layer_s: float
    cache_bytes: int
    context_tokens: int
    balanced_fraction: float
    enough_tok_s: float
    measured: str = ""


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str
    ops: tuple[str, ...]  # contrib/standard ops the exporter may emit
    precisions: dict[str, tuple[str, ...]]  # component -> allowed weight precisions
    block_size: int  # default layout of quantized components (see `layout`)
    accuracy_level: int  # MatMulNBits accuracy_level (4 = int8 compute on x86/arm64 MLAS)
    symmetric: bool
    scale_dtype: str  # default dtype of block scales
    activation_dtype: str
    kv_cache_dtype: str  # KV cache of quantized/fp16 plans (all-fp32 plans keep float32: they are exact)
    kv_cache_dtypes: tuple[str, ...]  # what the planner may use when the default does not fit (kv_cache_dtype first)
    fp16_resident_bytes: int  # bytes per fp16 weight element once the session is built (4 if ORT upcasts)
    max_protobuf_bytes: int  # model.onnx itself (initializers beyond go to external data)
    max_data_file_bytes: int  # one external-data file
    threads: dict[str, int]
    overhead: Overhead
    verify: dict[str, dict[str, float]]  # precision -> metric -> threshold
    speed: Speed = Speed({"fp32": 6e9, "int8": 4e9, "int4": 3.5e9}, 1e-4, 0, 512, 0.9, 100.0)
    rounding: str = "search"  # how symmetric block scales are chosen (quant.QuantScheme.rounding)
    layouts: dict[str, Layout] = field(default_factory=dict)  # per-component overrides of the default layout
    # tried in order (component -> Layout overrides) when the full pool fits no assignment at `layouts`
    fallback_layouts: tuple[dict[str, Layout], ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    # ---- capabilities --------------------------------------------------------------------------------
    def supports(self, op: str) -> bool:
        return op in self.ops

    def precisions_for(self, component: str) -> tuple[str, ...]:
        try:
            return self.precisions[component]
        except KeyError:
            raise EmoEdgeError(f"target '{self.name}': no precisions for component '{component}'") from None

    def layout(self, component: str) -> Layout:
        """The quantization layout of an int8/int4 component (`layouts` entry, else the target's default)."""
        return self.layouts.get(component) or Layout(self.block_size, self.symmetric, self.scale_dtype, self.rounding)

    @property
    def kv_bytes_per_element(self) -> int:
        return KV_BYTES[self.kv_cache_dtype]

    @property
    def scale_bytes(self) -> int:
        return {"float32": 4, "float16": 2}[self.scale_dtype]

    def overhead_bytes(self, weight_bytes: int, vocab: int, hidden: int) -> int:
        return self.overhead.bytes(weight_bytes, vocab, hidden)

    def thresholds(self, precision: str) -> dict[str, float]:
        try:
            return dict(self.verify[precision])
        except KeyError:
            raise EmoEdgeError(f"target '{self.name}': no verification thresholds for precision '{precision}' "
                               f"(has: {', '.join(sorted(self.verify))})") from None

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


# ---- the targets/<name>.json schema (pydantic, via emo_edge.schema) ------------------------------------------
NonNegativeFinite = Annotated[float, Field(allow_inf_nan=False, ge=0)]
Precision = Literal["fp32", "fp16", "int8", "int4"]
FloatDtype = Literal["float32", "float16"]
KVDtype = Literal["float32", "float16", "int8"]
Rounding = Literal["absmax", "search"]


class OverheadFile(Schema):
    base_bytes: Count
    weight_fraction: NonNegativeFinite
    per_token_per_hidden: Count
    prefill_tokens: Count


class LayoutFile(Schema):
    block_size: Positive
    symmetric: bool
    scale_dtype: FloatDtype
    rounding: Rounding | None = None  # None: the target's


class BandwidthFile(Schema):
    fp32: Positive
    int8: Positive
    int4: Positive


class SpeedFile(Schema):
    bandwidth: BandwidthFile
    layer_s: Annotated[float, Field(allow_inf_nan=False, gt=0, lt=1)]
    cache_bytes: Count
    context_tokens: Positive
    balanced_fraction: Annotated[float, Field(allow_inf_nan=False, gt=0, le=1)]
    enough_tok_s: Annotated[float, Field(allow_inf_nan=False, gt=0)]


class TargetFile(Schema):
    name: Str
    description: Str
    arch: Str
    ops: list[Str]
    precisions: dict[Str, list[Precision]]
    block_size: Positive
    accuracy_level: Count
    symmetric: bool
    scale_dtype: FloatDtype
    activation_dtype: FloatDtype
    kv_cache_dtype: KVDtype
    kv_cache_dtypes: list[KVDtype] = []
    fp16_resident_bytes: Positive
    max_protobuf_bytes: Positive
    max_data_file_bytes: Positive
    threads: dict[Str, Count]
    overhead: OverheadFile
    verify: dict[Str, dict[Str, NonNegativeFinite]]
    speed: SpeedFile
    rounding: Rounding = "search"
    layouts: dict[Str, LayoutFile] = {}
    fallback_layouts: list[dict[Str, LayoutFile]] = []


def _strip(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if not k.startswith("_")}
    return d


def load_target(path: str | Path) -> Target:
    path = Path(path)
    raw = load_json(path, EmoEdgeError)  # bounded size and nesting (so _strip's recursion is bounded too)
    if not isinstance(raw, dict):
        raise EmoEdgeError(f"{path}: a target is a JSON object")
    t = validate(_strip(raw), TargetFile, str(path), EmoEdgeError)
    notes = validate(raw.get("_notes", []), list[Str], f"{path}: field '_notes'", EmoEdgeError)
    measured = raw["overhead"].get("_measured", "")
    missing = [c for c in COMPONENTS if c not in t.precisions]
    if missing:
        raise EmoEdgeError(f"{path}: field 'precisions': no entry for component '{missing[0]}'")
    layouts = _layouts(path, t, {**dict.fromkeys(COMPONENTS), **t.layouts}, "layouts")
    fallback = tuple(_layouts(path, t, f, f"fallback_layouts[{i}]") for i, f in enumerate(t.fallback_layouts))
    raw_speed = raw.get("speed", {})
    target = Target(
        name=t.name, description=t.description, arch=t.arch, ops=tuple(t.ops),
        precisions={c: tuple(v) for c, v in t.precisions.items()}, block_size=t.block_size,
        accuracy_level=t.accuracy_level, symmetric=t.symmetric, scale_dtype=t.scale_dtype,
        activation_dtype=t.activation_dtype, kv_cache_dtype=t.kv_cache_dtype,
        kv_cache_dtypes=tuple(dict.fromkeys([t.kv_cache_dtype, *t.kv_cache_dtypes])),
        fp16_resident_bytes=t.fp16_resident_bytes, max_protobuf_bytes=t.max_protobuf_bytes,
        max_data_file_bytes=t.max_data_file_bytes, threads=dict(t.threads),
        overhead=Overhead(**t.overhead.model_dump(include=set(OverheadFile.model_fields)),
                          measured=measured if isinstance(measured, str) else ""),
        verify={p: dict(ms) for p, ms in t.verify.items()},
        speed=Speed(t.speed.bandwidth.model_dump(include={"fp32", "int8", "int4"}), t.speed.layer_s,
                    t.speed.cache_bytes, t.speed.context_tokens, t.speed.balanced_fraction, t.speed.enough_tok_s,
                    measured=raw_speed.get("_measured", "") if isinstance(raw_speed.get("_measured"), str) else ""),
        rounding=t.rounding, layouts=layouts, fallback_layouts=fallback, notes=tuple(notes),
    )
    if target.name != path.stem:
        raise EmoEdgeError(f"{path}: target name '{target.name}' does not match the file name")
    return target


def _layouts(path: Path, t: "TargetFile", entries: dict, field_name: str) -> dict[str, Layout]:
    """Checked Layouts of `entries` (component -> LayoutFile; None: the target's default layout, checked too)."""
    out = {}
    for c, lay in entries.items():
        where = f"{path}: field '{field_name}.{c}'" if lay is not None else f"{path}: the default layout"
        lay = lay or t
        if c not in COMPONENTS:
            raise EmoEdgeError(f"{where}: unknown component (known: {', '.join(COMPONENTS)})")
        if lay.block_size < 16 or lay.block_size & (lay.block_size - 1):
            raise EmoEdgeError(f"{where}: block_size {lay.block_size} is not a power of two >= 16")
        if lay.scale_dtype != t.activation_dtype and c not in FP16_SCALE_COMPONENTS:
            raise EmoEdgeError(f"{where}: scale_dtype {lay.scale_dtype} for {c}: its MatMulNBits needs scales of the "
                               f"activation dtype {t.activation_dtype} (only {', '.join(FP16_SCALE_COMPONENTS)} "
                               f"take other scales)")
        if entries[c] is not None:
            out[c] = Layout(lay.block_size, lay.symmetric, lay.scale_dtype,
                            getattr(lay, "rounding", None) or t.rounding)
    return out


def _load_all() -> dict[str, Target]:
    return {p.stem: load_target(p) for p in sorted(_DIR.glob("*.json"))}


TARGETS: dict[str, Target] = _load_all()


def get_target(name: str | Target | None = None) -> Target:
    if isinstance(name, Target):
        return name
    name = name or DEFAULT_TARGET
    try:
        return TARGETS[name]
    except KeyError:
        raise EmoEdgeError(f"unknown target '{name}' (known: {', '.join(sorted(TARGETS))})") from None
