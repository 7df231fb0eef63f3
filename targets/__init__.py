"""Deployment targets as data: what a target's onnxruntime build can run, and how we verify it.

Each `targets/<name>.json` describes one target. Exporters and the planner ask a `Target` for capabilities
(`supports(op)`, `precisions_for(component)`, `block_size`, `accuracy_level`, `overhead_bytes(...)`, ...);
they never branch on `target.name`. Keys starting with "_" in the JSON files are comments.

Registry: `TARGETS` maps name -> Target (every *.json in this directory); `get_target(name)` raises an
`EmoEdgeError` listing the known names for an unknown one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emo_edge.errors import EmoEdgeError

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


def _strip(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if not k.startswith("_")}
    return d


def load_target(path: str | Path) -> Target:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EmoEdgeError(f"{path}: cannot read target ({exc})") from None
    d = _strip(raw)
    notes = tuple(raw.get("_notes", ()))
    try:
        precisions = {c: tuple(v) for c, v in d["precisions"].items()}
        for c in COMPONENTS:
            bad = [p for p in precisions[c] if p not in PRECISIONS]
            if bad:
                raise EmoEdgeError(f"{path}: component '{c}' lists unknown precision '{bad[0]}'")
        verify = {p: {m: float(v) for m, v in ms.items()} for p, ms in d["verify"].items()}
        target = Target(
            name=d["name"], description=d["description"], arch=d["arch"], ops=tuple(d["ops"]),
            precisions=precisions, block_size=int(d["block_size"]), accuracy_level=int(d["accuracy_level"]),
            symmetric=bool(d["symmetric"]), scale_dtype=d["scale_dtype"], activation_dtype=d["activation_dtype"],
            kv_cache_dtype=d["kv_cache_dtype"], fp16_resident_bytes=int(d["fp16_resident_bytes"]),
            max_protobuf_bytes=int(d["max_protobuf_bytes"]), max_data_file_bytes=int(d["max_data_file_bytes"]),
            threads={k: int(v) for k, v in d["threads"].items()},
            overhead=Overhead(**d["overhead"], measured=raw["overhead"].get("_measured", "")),
            verify=verify, notes=notes,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EmoEdgeError(f"{path}: malformed target ({exc!r})") from None
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
