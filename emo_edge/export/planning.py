"""What to export: kept experts, precision per component, target data. A minimal local stand-in for
`emo_edge.plan.ExportPlan` (used when that module is absent) and `targets/` (local defaults)."""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field

from ..errors import EmoEdgeError, PoolError
from ..spec import EmoSpec

PRECISIONS = ("fp32", "fp16", "int8", "int4")

# target name -> data (used when targets/<name>.py is absent or lacks the fields)
LOCAL_TARGETS = {
    "cpu": dict(name="cpu", block_size=32, accuracy_level=4, threads=2,
                thresholds={"int8": dict(top1_min=0.90, kl_max=0.05, ppl_ratio_max=1.05),
                            "int4": dict(top1_min=0.60, kl_max=0.30, ppl_ratio_max=1.30)}),
    "arm64": dict(name="arm64", block_size=32, accuracy_level=4, threads=4,
                  thresholds={"int8": dict(top1_min=0.90, kl_max=0.05, ppl_ratio_max=1.05),
                              "int4": dict(top1_min=0.60, kl_max=0.30, ppl_ratio_max=1.30)}),
}


METRIC_KEYS = {"top1_agreement": "top1_min", "kl": "kl_max", "ppl_ratio": "ppl_ratio_max"}


def load_target(name: str) -> dict:
    """The target's data as a dict: targets.get_target (targets/<name>.json) when present, else local defaults."""
    try:
        from targets import get_target  # type: ignore
    except ImportError:
        get_target = None
    if get_target is not None:
        t = get_target(name)  # raises EmoEdgeError naming the known targets
        th = {p: {METRIC_KEYS.get(m, m): v for m, v in ms.items()} for p, ms in t.verify.items()}
        return dict(name=t.name, block_size=t.block_size, accuracy_level=t.accuracy_level, symmetric=t.symmetric,
                    scale_dtype=t.scale_dtype, thresholds=th, threads=t.threads, obj=t)
    return _local_target(name)


def _local_target(name: str) -> dict:
    if name not in LOCAL_TARGETS:
        try:
            mod = importlib.import_module(f"targets.{name}")
        except ImportError:
            raise EmoEdgeError(f"unknown target '{name}' (known: {', '.join(sorted(LOCAL_TARGETS))})") from None
        base = {}
    else:
        base = dict(LOCAL_TARGETS[name])
        try:
            mod = importlib.import_module(f"targets.{name}")
        except ImportError:
            mod = None
    data = getattr(mod, "TARGET", None) if mod is not None else None
    if isinstance(data, dict):
        base.update(data)
    if not base:
        raise EmoEdgeError(f"target '{name}' has no data")
    return base


@dataclass
class LocalPlan:
    """Per-layer kept routed experts (source numbering; None = dense layer), precision per component."""
    experts: list
    attention: str = "fp32"
    experts_precision: str = "fp32"
    embedding: str = "fp32"
    lm_head: str = "fp32"
    block_size: int = 32
    accuracy_level: int = 4
    context: int = 4096
    budget_bytes: int | None = None
    estimated_bytes: int = 0
    trims: list = field(default_factory=list)
    symmetric: bool = True
    scale_dtype: str = "float32"
    source: dict | None = None  # emo_edge.plan.ExportPlan.to_dict() when the real planner made the plan

    @property
    def label(self) -> str:
        ps = {self.attention, self.experts_precision, self.embedding, self.lm_head}
        return ps.pop() if len(ps) == 1 else "mixed"

    @property
    def lowest(self) -> str:
        """The least precise component precision (selects the verification thresholds)."""
        order = ["int4", "int8", "fp16", "fp32"]
        return min((self.attention, self.experts_precision, self.embedding, self.lm_head), key=order.index)

    def to_dict(self) -> dict:
        if self.source is not None:
            return dict(self.source)
        d = asdict(self)
        d["precision"] = {"attention": self.attention, "experts": self.experts_precision,
                          "embedding": self.embedding, "lm_head": self.lm_head, "router": "fp32"}
        return d


def _bytes_per_param(prec: str, block: int) -> float:
    return {"fp32": 4.0, "fp16": 2.0, "int8": 1.0 + 4.0 / block, "int4": 0.5 + 4.0 / block}[prec]


def estimate_bytes(spec: EmoSpec, experts: list, prec: dict, block: int) -> int:
    """Bundle size of the weights for a precision assignment (scales included)."""
    h = spec.hidden_size
    n_exp = sum(len(e) + len(l.implicit_experts) for e, l in zip(experts, spec.layers) if e is not None)
    b = spec.attention_params() * spec.num_layers * _bytes_per_param(prec["attention"], block)
    b += n_exp * spec.expert_params() * _bytes_per_param(prec["experts"], block)
    b += sum(1 for l in spec.layers if l.num_experts == 0) * spec.dense_mlp_params() * \
        _bytes_per_param(prec["experts"], block)
    b += spec.vocab_size * h * (_bytes_per_param(prec["embedding"], block) + _bytes_per_param(prec["lm_head"], block))
    b += sum(l.num_experts for l in spec.layers) * h * 4
    return int(b)


def make_plan(spec: EmoSpec, experts: list, precision: str, budget: int | None, context: int,
              target: dict, identity: str = "") -> LocalPlan:
    """emo_edge.plan.make_plan when it exists (auto search, budget, trims), except for fp32, which that
    planner's targets do not list but exact verification needs; then the local planner."""
    try:
        from .. import plan as real  # type: ignore
    except ImportError:
        real = None
    if real is not None and precision != "fp32" and "obj" in target:
        ep = real.make_plan(spec, experts, budget, context, target["obj"], precision, identity=identity)
        pr = ep.precision
        return LocalPlan(experts=ep.experts, attention=pr["attention"], experts_precision=pr["experts"],
                         embedding=pr["embedding"], lm_head=pr["lm_head"], block_size=ep.block_size,
                         accuracy_level=ep.accuracy_level, context=ep.context, budget_bytes=ep.budget,
                         estimated_bytes=int(ep.bytes.get("total", 0)), trims=ep.trimmed, symmetric=ep.symmetric,
                         scale_dtype=ep.scale_dtype, source=ep.to_dict())
    return _local_plan(spec, experts, precision, budget, context, target)


def _local_plan(spec: EmoSpec, experts: list, precision: str, budget: int | None, context: int,
                target: dict) -> LocalPlan:
    if precision not in ("auto",) + PRECISIONS:
        raise EmoEdgeError(f"unknown precision '{precision}' (auto, {', '.join(PRECISIONS)})")
    block = int(target.get("block_size", 32))
    if precision == "auto":
        order = ["fp32", "int8", "int4"]
        chosen = None
        for p in order:
            prec = dict(attention=p, experts=p, embedding=p, lm_head=p)
            if budget is None or estimate_bytes(spec, experts, prec, block) <= budget:
                chosen = p
                break
        if chosen is None:
            need = estimate_bytes(spec, experts, dict(attention="int4", experts="int4", embedding="int4",
                                                      lm_head="int4"), block)
            raise EmoEdgeError(f"budget {budget} bytes is too small: the pools need {need} bytes even at int4")
        precision = chosen
    prec = dict(attention=precision, experts=precision, embedding=precision, lm_head=precision)
    if precision != "fp32" and spec.hidden_size % block:
        # GatherBlockQuantized needs hidden % block == 0; keep the embedding fp32 then
        prec["embedding"] = "fp32"
    est = estimate_bytes(spec, experts, prec, block)
    if budget is not None and est > budget:
        raise EmoEdgeError(f"the pools need {est} bytes at {precision}, over the budget of {budget} bytes")
    return LocalPlan(experts=experts, attention=prec["attention"], experts_precision=prec["experts"],
                     embedding=prec["embedding"], lm_head=prec["lm_head"], block_size=block,
                     accuracy_level=int(target.get("accuracy_level", 4)), context=context, budget_bytes=budget,
                     estimated_bytes=est, symmetric=bool(target.get("symmetric", True)),
                     scale_dtype=target.get("scale_dtype", "float32"))


def resolve_pool_layers(view, pools: str, spec: EmoSpec) -> tuple[list, list[dict]]:
    """--pools 'math,code' | 'all' | a.json,b.json -> (per-layer kept routed ids or None, pool descriptions).

    Uses emo_edge.pools.resolve_pools/compose when that package exists; otherwise pool files and 'all'."""
    names = [n.strip() for n in pools.split(",") if n.strip()]
    if not names:
        raise PoolError("--pools is empty")
    if names == ["all"]:
        layers = [None if l.num_experts == 0 else list(l.routed_experts) for l in spec.layers]
        return layers, [{"name": "all"}]
    try:
        from ..pools import compose, resolve_pools  # type: ignore
    except ImportError:
        compose = resolve_pools = None
    if resolve_pools is not None:
        resolved = resolve_pools(view, names)
        pool = compose(resolved)
        layers = getattr(pool, "layers", pool)
        desc = [{"name": getattr(p, "name", str(n))} for p, n in zip(resolved, names)]
        return _normalise(layers, spec), desc
    from ..poolfile import read_pool_file
    from pathlib import Path
    merged: list[set] = [set() for _ in spec.layers]
    desc = []
    for n in names:
        if not Path(n).is_file():
            raise PoolError(f"unknown pool '{n}': not a pool file (the pool library emo_edge.pools is not "
                            f"available; give pool JSON files or 'all')")
        for i, entry in enumerate(read_pool_file(n, spec)):
            merged[i] |= set(spec.layers[i].routed_experts if entry is None else entry)
        desc.append({"name": Path(n).stem, "file": str(n)})
    return _normalise([sorted(m) for m in merged], spec), desc


def _normalise(layers, spec: EmoSpec) -> list:
    out = []
    for l, entry in zip(spec.layers, layers):
        if l.num_experts == 0:
            out.append(None)
        elif entry is None:
            out.append(list(l.routed_experts))
        else:
            ids = sorted(set(int(e) for e in entry) - set(l.implicit_experts))
            if len(ids) < l.routed_k:
                raise PoolError(f"layer {l.index}: pools keep {len(ids)} routed experts; each token needs {l.routed_k}")
            out.append(ids)
    return out
