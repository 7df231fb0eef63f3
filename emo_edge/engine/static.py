"""The static engine: an exported bundle with its experts fixed at export, one onnxruntime session."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import BundleError, PoolError
from .ort_session import cpu_session, session_options
from .base import MANIFEST, Engine, nothing_swapped
from .memory import peak_rss, rss
from .session import LOGITS_TO_KEEP, BoundGraph, KVCache, kv_dtype, shares_kv


class StaticEngine(Engine):
    """A static bundle (sha256-checked, paths confined), ready to run. Its one pool is the union it was exported
    for, named by its pools joined with '+' (e.g. 'math+code'); it can be served under that name only."""

    kind = "static"

    def __init__(self, root: str | Path, threads: int | None = None, verify_files: bool = True,
                 max_tokens: int | None = None):
        from ..bundle.files import check_files, read_manifest
        from ..bundle.schema import bundle_file, check_graph_files, read_model_dims

        self.root = Path(root)
        if verify_files:
            self.manifest = read_manifest(self.root)
            if self.manifest.get("kind") == "swappable":
                raise BundleError(f"{self.root}: a swappable bundle (backbone + expert shards); open it with "
                                  f"open_engine or run it with `emo-edge chat {self.root} --budget ...`")
            check_files(self.root, self.manifest)
        else:  # the exporter's own check of a bundle still being written (no manifest yet)
            self.manifest = {}
        self.config = read_model_dims(self.root, self.manifest, need_filename=True)
        dec = self.config["decoder"]
        self.n_layers, self.kv_heads, self.head_dim = dec["num_hidden_layers"], dec["num_key_value_heads"], \
            dec["head_size"]
        self.vocab_size, self.context = self.config["vocab_size"], self.config["context_length"]
        self.token_limit = self.context if max_tokens is None else max(1, min(max_tokens, self.context))
        self.eos = self.config.get("eos_token_id")
        self.name = self.root.resolve().name
        names = [p.get("name") for p in self.manifest.get("pools") or [] if isinstance(p, dict)]
        self.pool_name = "+".join(str(n) for n in names) or "bundle"
        self.pools = [self.pool_name]
        genai = self.root / "genai_config.json"
        if dec.get("filename") is None:
            raise BundleError(f"{genai}: field 'model.decoder.filename': missing (the decoder graph)")
        if verify_files:
            graph = bundle_file(self.root, self.manifest, dec["filename"], f"{genai}: field 'model.decoder.filename'")
            check_graph_files(self.root, self.manifest, graph)
        else:
            graph = self.root / dec["filename"]
        try:
            self.session_ = cpu_session(str(graph), session_options(threads))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{self.root}: onnxruntime cannot load the model ({str(exc).splitlines()[0]})") from None
        self._check_inputs(genai)
        self.kv_dtype = kv_dtype([self.session_], f"{genai}: the decoder graph")
        self.kv_shared = shares_kv(self.head_dim)
        # + logits_to_keep where the graph has it (an overridable initializer: not among get_inputs())
        self._inputs = [i.name for i in self.session_.get_inputs()] + [
            i.name for i in self.session_.get_overridable_initializers() if i.name == LOGITS_TO_KEEP]
        self._outputs = [o.name for o in self.session_.get_outputs()]
        self._tok = None
        self.loaded_rss = rss()
        self.memory = {"budget": None, "backbone_rss": self.loaded_rss, "required_one_pool": self.loaded_rss,
                       "required_all_pools": self.loaded_rss}

    def _check_inputs(self, genai: Path) -> None:
        """The graph's inputs are exactly what genai_config.json's dims feed it (layers, KV heads, head size)."""
        from ..bundle.schema import check_decoder_inputs

        got = {i.name: i.shape for i in self.session_.get_inputs()}
        check_decoder_inputs(f"{genai}: field 'model.decoder", got, self.config)
        plain = {k for k in got if not k.startswith("past_key_values.")}
        if plain != {"input_ids", "attention_mask", "position_ids"}:
            raise BundleError(f"{genai}: the graph's inputs {sorted(plain)} are not the decoder's (input_ids, "
                              f"attention_mask, position_ids)")

    # ---- the engine API ------------------------------------------------------------------------------------
    def _bind(self, kv: KVCache):
        return BoundGraph(self.session_, kv, self._inputs, self._outputs, f"{self.root / MANIFEST}: the decoder").run

    def _check_pool(self, pool) -> None:
        if pool not in (None, "auto", "doc", self.pool_name):
            raise PoolError(f"pool '{pool}' is not this static bundle's: it holds '{self.pool_name}' (export a "
                            f"bundle for '{pool}', or a swappable one)")

    def serving(self, pool=None) -> contextlib.AbstractContextManager:
        self._check_pool(pool)
        return nothing_swapped(self.pool_name)

    def use(self, pool):
        from .swappable.layers import SwapStats

        self._check_pool(pool)
        return SwapStats(pool=self.pool_name, noop=True)

    def choose_pool(self, ids, mode: str = "auto"):
        return self.pool_name, "a static bundle holds one pool", {self.pool_name: 1.0}

    def resident_pool(self) -> str:
        return self.pool_name

    def stats(self) -> dict:
        n = sum(len(r.get("routed_source_ids") or []) + len(r.get("implicit_source_ids") or [])
                for r in self.manifest.get("experts") or [])
        return {"resident_experts": n, "active_experts": n, "rss": rss(), "peak_rss": peak_rss(), "budget": None}
