"""export: checkpoint + pools + budget -> verified bundle, written to a temporary directory and renamed into
place only when complete and verified.

    plan_export: resolve (model, pools, target) -> plan      (export --dry-run stops here, discovering nothing)
    -> build graph (layer by layer, streaming) -> onnx.checker
    -> tokenizer + genai_config + config.json (Hugging Face) -> verify -> report -> manifest (sha256) -> rename
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import progress as progress_out
from ..model.checkpoint import CheckpointView
from ..errors import BundleError, EmoEdgeError
from ..model.names import TensorKey
from ..fsutil import atomic_dir, check_target, os_reason
from ..units import parse_size
from ..plan.search import ExportPlan, format_plan, make_plan
from . import bundle_writer, planning

# Heavy imports (onnx, torch) happen inside the stages that need them (build, verify, pool discovery), so that
# `emo-edge export` checks every argument first and a typo fails in a fraction of a second.

PRECISION_ORDER = ("int4", "int8", "fp16", "fp32")  # least precise first


class VerificationError(BundleError):
    """The bundle does not match the reference within the target's thresholds."""


def rss_peak() -> int:
    """The process's peak resident set size so far: VmHWM from /proc/self/status, else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rope_caches(spec, context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [context, head_dim/2] for GroupQueryAttention (attention scaling folded in)."""
    from ..model import rope
    if spec.rope_type == "dynamic":
        original = spec.max_position_embeddings or spec.rope_scaling.get("original_max_position_embeddings")
        if context > original:
            raise EmoEdgeError(f"rope_scaling 'dynamic' changes the frequencies with the sequence length; a static "
                               f"bundle supports at most the original {original} positions, but --context is "
                               f"{context}")
    cos, sin = rope.cos_sin(spec, np.arange(context))
    half = spec.head_dim // 2
    return cos[:, :half], sin[:, :half]


def default_out(model: Path, pools: str, precision: str) -> Path:
    tag = "-".join(Path(p).stem for p in pools.split(",") if p.strip())
    return Path("bundles") / f"{model.resolve().name}-{tag}-{precision}"


def plan_label(plan: ExportPlan) -> str:
    """One word for the bundle name: the common precision, or 'mixed'."""
    used = {plan.precision[c] for c in ("attention", "experts", "embedding", "lm_head")}
    return used.pop() if len(used) == 1 else "mixed"


def plan_lowest(plan: ExportPlan) -> str:
    """The least precise component precision: it selects the verification thresholds."""
    return min((plan.precision[c] for c in ("attention", "experts", "embedding", "lm_head")),
               key=PRECISION_ORDER.index)


def stage_bar(progress: bool, total: float, desc: str, unit: str):
    """The CLI's progress bar (emo_edge.progress), or a silent one when the caller asked for no progress."""
    return progress_out.bar(total, desc, unit) if progress else progress_out._Silent()


def build(view: CheckpointView, plan: ExportPlan, dst: Path, progress: bool, kv_scales=None,
          fold_shared: bool = False) -> dict:
    """`kv_scales`: the int8 KV cache's calibrated scales (export/kv_scales.py) when the plan has one;
    `fold_shared`: EMO's shared expert inside each QMoE (exporters/onnx.py DecoderBuilder)."""
    from exporters import onnx as onnx_exporter

    from . import weights

    spec = view.spec
    dims = onnx_exporter.ModelDims(spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_layers,
                                   spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rms_norm_eps,
                                   spec.norm_topk_prob, plan.context)
    pr = plan.precision
    prec = onnx_exporter.Precision(pr["attention"], pr["experts"], pr["embedding"], pr["lm_head"],
                                   dict(plan.layouts), plan.accuracy_level, plan.kv_cache_dtype,
                                   None if kv_scales is None else kv_scales.scales)
    cos, sin = rope_caches(spec, plan.context)
    b = onnx_exporter.DecoderBuilder(dst, dims, prec, cos, sin, fold_shared=fold_shared)
    emb_rows = lambda a, c: view.tensor(TensorKey("embed"), rows=np.arange(a, c)).numpy()  # noqa: E731
    head_key = TensorKey("embed" if spec.tie_word_embeddings else "lm_head")
    head_rows = lambda a, c: view.tensor(head_key, rows=np.arange(a, c)).numpy()  # noqa: E731
    bar = stage_bar(progress, spec.num_layers + 2, "export: build graph", "step")
    try:
        b.embedding(emb_rows)
        bar.update()
        for i in range(spec.num_layers):
            bar.set_postfix_str(f"layer {i}")
            try:
                b.layer(i, weights.layer_weights(view, i, plan.experts[i]))
            except ValueError as exc:
                raise BundleError(f"layer {i}: {exc}") from None
            bar.update()
        b.head(view.tensor(TensorKey("final_norm")).numpy(), head_rows)
        bar.update()
        path = b.save()
    finally:
        b.data.close()
        bar.close()
    onnx_exporter.check(path)
    return {"model.onnx": path.stat().st_size, "model.onnx.data": (dst / "model.onnx.data").stat().st_size}


DEFAULT_CONTEXT = 4096  # when the checkpoint does not know its own (max_position_embeddings: -1)


@dataclass(frozen=True)
class Planned:
    """The planning stage's result: what the build stage follows, and what `export --dry-run` prints."""

    plan: ExportPlan
    pools: list  # per pool: its description for the manifest and report
    target: Any  # the Target the plan was made for
    pending: list = field(default_factory=list)  # planning.PendingPool: to be discovered first (dry run only)


def plan_export(view: CheckpointView, pools: str, budget: str | None, context: int | None, target: str,
                precision: str, progress: bool = True, discover: bool = True, optimize: str = "balanced") -> Planned:
    """resolve pools (discovering built-in domains the catalog lacks, unless `discover` is False) -> plan.
    Reads no weight except through discovery; with `discover=False` it reads only headers, catalog entries and
    pool files, and writes nothing."""
    from targets import get_target

    spec = view.spec
    tgt = get_target(target)
    budget_bytes = parse_size(budget, "--budget") if budget else None
    if context is None:
        context = spec.max_position_embeddings or DEFAULT_CONTEXT
    if discover:
        layers, pool_desc, scores = planning.resolve_pool_layers(
            view, pools, spec, progress=progress_out.factory("tok") if progress else None,
            log=progress_out.note if progress else None)
        pending = []
    else:
        layers, pool_desc, scores, pending = planning.peek_pool_layers(view, pools, spec)
    if context < 8:
        raise EmoEdgeError(f"--context {context} is too small")
    plan = make_plan(spec, layers, budget_bytes, context, tgt, precision, expert_scores=scores, optimize=optimize,
                     identity=view.identity)
    if pending:
        plan = dataclasses.replace(plan, notes=[*plan.notes, planning.pending_note(spec, pending)])
    return Planned(plan, pool_desc, tgt, pending)


FOLD_NOTE = ("optimize speed: each layer's shared expert runs as the last expert of its QMoE (always selected, "
             "weight 1), one kernel instead of four (its logits differ in the last bits from a swappable bundle's, "
             "which keeps it apart)")


def folds_shared(spec, plan: ExportPlan, fold_shared: bool | None = None) -> bool:
    """Whether an export of `plan` puts EMO's shared expert inside a QMoE: asked for (`fold_shared`; None: under
    --optimize speed) and possible in some layer (exporters/onnx.py shared_expert_folds, the builder's rule)."""
    from exporters.onnx import shared_expert_folds

    wanted = plan.optimize == "speed" if fold_shared is None else fold_shared
    quantized = plan.quant_scheme("experts") is not None
    return wanted and any(shared_expert_folds(layer.routing, len(layer.implicit_experts), layer.routed_k, quantized,
                                              spec.norm_topk_prob) for layer in spec.layers)


def export(model: Path, pools: str, budget: str | None, context: int | None, target: str, precision: str,
           out: Path | None, force: bool, verify: bool, progress: bool = True, n_verify: int | None = None,
           optimize: str = "balanced", fold_shared: bool | None = None) -> dict:
    """`n_verify`: held-out sequences to verify on (None: by model size, see export/verify.py verify_sample);
    `optimize`: how `auto` chooses among fitting plans (balanced | quality | speed, see emo_edge/plan/search.py);
    `fold_shared`: see `build`; None: the plan says (optimize speed, see `folds_shared`). The swappable
    exporter passes False: its pool shards hold routed experts only."""
    t0 = time.perf_counter()
    if out is not None:  # fail before any work; checked again at the rename
        check_target(out, force)
    view = CheckpointView(model)
    spec = view.spec
    planned = plan_export(view, pools, budget, context, target, precision, progress, optimize=optimize)
    plan, pool_desc, tgt, context = planned.plan, planned.pools, planned.target, planned.plan.context
    fold_shared = folds_shared(spec, plan, fold_shared)
    if fold_shared:
        plan = dataclasses.replace(plan, notes=[*plan.notes, FOLD_NOTE])
    if progress:
        progress_out.note(format_plan(plan))
    layers = plan.experts  # the planner may have trimmed experts to fit the budget
    out = check_target(out if out is not None else default_out(model, pools, plan_label(plan)), force)
    timings = {}
    try:
        with atomic_dir(out, force, error=BundleError) as tmp:
            kv = None
            if plan.kv_cache_dtype == "int8":
                from . import kv_scales

                t = time.perf_counter()
                bar = stage_bar(progress, spec.num_layers, "export: calibrate int8 KV cache", "layer")
                try:
                    kv = kv_scales.calibrate(view, layers, progress=bar.update)
                finally:
                    bar.close()
                timings["kv_calibration"] = time.perf_counter() - t
            t = time.perf_counter()
            sizes = build(view, plan, tmp, progress, kv, fold_shared)
            timings["build"] = time.perf_counter() - t
            peak = rss_peak()
            bundle_writer.copy_tokenizer(Path(model), tmp, context)
            bundle_writer.write_json(tmp / "genai_config.json", bundle_writer.genai_config(spec, context))
            bundle_writer.write_json(tmp / "config.json", bundle_writer.hf_config(
                spec, context, [None if e is None else len(e) for e in layers]))
            from . import weights

            remap = [weights.remap(l, e) for l, e in zip(spec.layers, layers)]
            result = None
            if verify:
                t = time.perf_counter()
                result = _verify(view, layers, plan, tmp, tgt, progress, n_verify)
                timings["verify"] = time.perf_counter() - t
            name = out.name
            report = {"name": name, "path": str(out), "source": {"path": str(model), "identity": view.identity},
                      "pools": pool_desc, "target": tgt.name, "plan": plan_summary(plan),
                      "experts_per_layer": [None if e is None else len(e) for e in layers],
                      "sizes": sizes, "verification": result, "peak_rss_build_bytes": peak,
                      "kv_calibration": None if kv is None else kv.provenance,
                      "peak_rss_bytes": rss_peak(),
                      "timings_s": {**timings, "total": time.perf_counter() - t0}}
            bundle_writer.write_json(tmp / "report.json", report)
            (tmp / "report.md").write_text(bundle_writer.report_md(report), encoding="utf-8")
            if result is not None and not result["passed"]:
                r = result
                raise VerificationError(
                    f"verification failed: {'; '.join(r['failures'])} (measured: top-1 {r['top1_agreement']:.3f}, "
                    f"KL {r['kl_mean']:.4f}, ppl ratio {r['ppl_ratio']:.3f}, max|diff| {r['max_abs_diff']:.3g}; "
                    f"no bundle written)")
            bundle_writer.write_manifest(tmp, {
                "source": report["source"], "pools": pool_desc, "experts": remap, "plan": plan.to_dict(),
                "precision": plan_summary(plan)["precision"],
                "target": tgt.name, "context_length": context})
    except OSError as exc:
        what = os_reason(exc)
        raise BundleError(f"{out}: export failed while writing ({what}); nothing was left behind") from None
    return report


def plan_summary(plan: ExportPlan) -> dict:
    """The fields report.md shows."""
    return {"precision": dict(plan.precision), "block_size": plan.layouts["experts"]["block_size"],
            "layouts": dict(plan.layouts), "kv_cache_dtype": plan.kv_cache_dtype, "speed": dict(plan.speed),
            "context": plan.context,
            "budget_bytes": plan.budget, "estimated_bytes": plan.bytes.get("total", 0), "trimmed": plan.trimmed,
            "notes": plan.notes, "table": format_plan(plan), "plan": plan.to_dict()}


def _verify(view, layers, plan, tmp, tgt, progress, n_verify) -> dict:
    from ..model.reference import Reference
    from ..model.tokenizer import TextTokenizer
    spec = view.spec
    big = spec.vocab_size * spec.hidden_size * spec.num_layers > 2e9 or spec.intermediate_size >= 512
    ref = Reference(view, pool=layers, streaming=big)
    tok = TextTokenizer(tmp / "tokenizer.json")
    lowest = plan_lowest(plan)
    quantized = lowest != "fp32"
    th = {METRIC_KEYS[m]: v for m, v in tgt.verify.get(lowest, {}).items() if m in METRIC_KEYS}
    return verify_mod().verify(tmp, ref, tok.encode, quantized, th, n_seq=n_verify, progress=progress,
                               parameters=spec.param_counts()["total"])


METRIC_KEYS = {"top1_agreement": "top1_min", "kl": "kl_max", "ppl_ratio": "ppl_ratio_max"}


def verify_mod():
    from . import verify
    return verify


def dry_run(model: Path, pools: str, budget: str | None, context: int | None, target: str, precision: str,
            out: Path | None, force: bool, swappable: bool = False, optimize: str = "balanced"
            ) -> tuple[Planned, Path]:
    """The plan `export` would follow and the bundle path it would write (checked as the export checks it):
    no pool is discovered, no weight read, nothing written. `swappable`: the plan of the pools' union that the
    swappable export builds (with no budget: `chat --budget` applies one at run time)."""
    view = CheckpointView(model)
    planned = plan_export(view, pools, None if swappable else budget, context, target, precision, discover=False,
                          optimize=optimize)
    if out is None:
        out = default_out(model, pools, precision + "-swappable" if swappable else plan_label(planned.plan))
    return planned, check_target(out, force)
