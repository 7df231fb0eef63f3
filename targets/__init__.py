"""Deployment targets as data: what a target's onnxruntime build can run, and how we verify it.

Each `targets/<name>.json` describes one target. Exporters and the planner ask a `Target` for capabilities
(`supports(op)`, `precisions_for(component)`, `block_size`, `accuracy_level`, `overhead_bytes(...)`, ...);
they never branch on `target.name`. Keys starting with "_" in the JSON files are comments.

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
    """Runtime memory beyond weight bytes and the KV cache, as a formula fitted to measurements:
        base + weight_fraction * weight_bytes + prefill_tokens * (vocab * 4 + per_token_per_hidden * hidden)
    (the logits of a prefill chunk are [T, vocab] fp32; the rest are activations/arena slack)."""

    base_bytes: int
    weight_fraction: float
    per_token_per_hidden: int
    prefill_tokens: int
    measured: str = ""

    def bytes(self, weight_bytes: int, vocab: int, hidden: int) -> int:
        per_token = vocab * 4 + self.per_token_per_hidden * hidden
        return int(self.base_bytes + self.weight_fraction * weight_bytes + self.prefill_tokens * per_token)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str
    ops: tuple[str, ...]  # contrib/standard ops the exporter may emit
    precisions: dict[str, tuple[str, ...]]  # component -> allowed weight precisions
    block_size: int
    accuracy_level: int  # MatMulNBits accuracy_level (4 = int8 compute on x86/arm64 MLAS)
    symmetric: bool
    scale_dtype: str  # dtype of block scales (= activation dtype for MatMulNBits)
    activation_dtype: str
    kv_cache_dtype: str
    fp16_resident_bytes: int  # bytes per fp16 weight element once the session is built (4 if ORT upcasts)
    max_protobuf_bytes: int  # model.onnx itself (initializers beyond go to external data)
    max_data_file_bytes: int  # one external-data file
    threads: dict[str, int]
    overhead: Overhead
    verify: dict[str, dict[str, float]]  # precision -> metric -> threshold
    notes: tuple[str, ...] = field(default_factory=tuple)

    # ---- capabilities --------------------------------------------------------------------------------
    def supports(self, op: str) -> bool:
        return op in self.ops

    def precisions_for(self, component: str) -> tuple[str, ...]:
        try:
            return self.precisions[component]
        except KeyError:
            raise EmoEdgeError(f"target '{self.name}': no precisions for component '{component}'") from None

    @property
    def kv_bytes_per_element(self) -> int:
        return {"float32": 4, "float16": 2}[self.kv_cache_dtype]

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


class OverheadFile(Schema):
    base_bytes: Count
    weight_fraction: NonNegativeFinite
    per_token_per_hidden: Count
    prefill_tokens: Count


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
    kv_cache_dtype: FloatDtype
    fp16_resident_bytes: Positive
    max_protobuf_bytes: Positive
    max_data_file_bytes: Positive
    threads: dict[Str, Count]
    overhead: OverheadFile
    verify: dict[Str, dict[Str, NonNegativeFinite]]


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
    target = Target(
        name=t.name, description=t.description, arch=t.arch, ops=tuple(t.ops),
        precisions={c: tuple(v) for c, v in t.precisions.items()}, block_size=t.block_size,
        accuracy_level=t.accuracy_level, symmetric=t.symmetric, scale_dtype=t.scale_dtype,
        activation_dtype=t.activation_dtype, kv_cache_dtype=t.kv_cache_dtype,
        fp16_resident_bytes=t.fp16_resident_bytes, max_protobuf_bytes=t.max_protobuf_bytes,
        max_data_file_bytes=t.max_data_file_bytes, threads=dict(t.threads),
        overhead=Overhead(**t.overhead.model_dump(include=set(OverheadFile.model_fields)),
                          measured=measured if isinstance(measured, str) else ""),
        verify={p: dict(ms) for p, ms in t.verify.items()}, notes=tuple(notes),
    )
    if target.name != path.stem:
        raise EmoEdgeError(f"{path}: target name '{target.name}' does not match the file name")
    return target


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
