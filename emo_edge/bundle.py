"""Loading an exported bundle on the device side: sha256 checks, the onnxruntime session, prefill/decode and
generation. Imports onnxruntime, numpy and tokenizers only (never torch)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import BundleError
from .ort_session import cpu_session

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_manifest(root: Path) -> dict:
    """manifest.json, bounded and validated against `bundle_schema.Manifest` (a plain dict for the loaders);
    a manifest that is a symlink out of the bundle is refused."""
    from .bundle_schema import read_manifest as read
    from .schema import confined

    root = Path(root)
    if (root / MANIFEST).is_symlink():
        confined(root, MANIFEST, f"{root / MANIFEST}", BundleError)
    return read(root)


def check_files(root: Path, manifest: dict, skip: set | frozenset = frozenset()) -> None:
    """Every file listed in the manifest is a plain name inside the bundle (symlinks resolved), exists, and has
    its size and sha256 (`skip`: names checked otherwise, e.g. expert shards hashed per record)."""
    from .schema import confined

    for name, entry in sorted(manifest["files"].items()):
        p = confined(root, name, f"{root / MANIFEST}: field 'files.{name}'", BundleError)
        if not p.is_file():
            raise BundleError(f"{p}: missing (listed in {MANIFEST})")
        if p.stat().st_size != entry["bytes"]:
            raise BundleError(f"{p}: has {p.stat().st_size} bytes, manifest says {entry['bytes']} (corrupted)")
        if name not in skip and sha256_file(p) != entry["sha256"]:
            raise BundleError(f"{p}: sha256 mismatch (corrupted or modified)")


PREFILL_CHUNK = 256  # tokens per prefill step; targets/*.json overhead formulas assume it


def decoder_feed(ids: Sequence[int], cache: list[np.ndarray], context: int, vocab_size: int,
                 n_layers: int) -> dict[str, np.ndarray]:
    """The genai-style decoder inputs for new tokens `ids` after the cached past (2*layers arrays)."""
    ids = np.asarray(ids, np.int64).reshape(1, -1)
    past = cache[0].shape[2]
    total = past + ids.shape[1]
    if total > context:
        raise BundleError(f"sequence of {total} tokens exceeds the bundle's context length {context}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise BundleError(f"token id outside the vocabulary [0, {vocab_size})")
    feed = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(past, total, dtype=np.int64)[None]}
    for i in range(n_layers):
        feed[f"past_key_values.{i}.key"] = cache[2 * i]
        feed[f"past_key_values.{i}.value"] = cache[2 * i + 1]
    return feed


class Bundle:
    """An exported bundle, checked and ready to run."""

    def __init__(self, root: str | Path, threads: int | None = None, verify_files: bool = True):
        import onnxruntime as ort

        from .bundle_schema import bundle_file, check_graph_files, read_model_dims

        self.root = Path(root)
        if verify_files:
            self.manifest = read_manifest(self.root)
            if self.manifest.get("kind") == "swappable":
                raise BundleError(f"{self.root}: a swappable bundle (backbone + expert shards); run it with "
                                  f"`emo-edge chat {self.root} --budget ...`")
            check_files(self.root, self.manifest)
        else:  # the exporter's own check of a bundle still being written (no manifest yet)
            self.manifest = {}
        self.config = read_model_dims(self.root, self.manifest, need_filename=True)
        dec = self.config["decoder"]
        self.n_layers, self.kv_heads, self.head_dim = dec["num_hidden_layers"], dec["num_key_value_heads"], \
            dec["head_size"]
        self.vocab_size, self.context = self.config["vocab_size"], self.config["context_length"]
        self.eos = self.config.get("eos_token_id")
        genai = self.root / "genai_config.json"
        if dec.get("filename") is None:
            raise BundleError(f"{genai}: field 'model.decoder.filename': missing (the decoder graph)")
        if verify_files:
            graph = bundle_file(self.root, self.manifest, dec["filename"], f"{genai}: field 'model.decoder.filename'")
            check_graph_files(self.root, self.manifest, graph)
        else:
            graph = self.root / dec["filename"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            self.session = cpu_session(str(graph), opts)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{self.root}: onnxruntime cannot load the model ({str(exc).splitlines()[0]})") from None
        self._check_inputs(genai)
        self._tok = None

    # ---- tokenizer -------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tok is None:
            from .tokenizer import TextTokenizer
            path = self.root / "tokenizer.json"
            if self.manifest:
                from .bundle_schema import bundle_file
                path = bundle_file(self.root, self.manifest, "tokenizer.json", f"{self.root / MANIFEST}: the tokenizer")
            self._tok = TextTokenizer(path)
        return self._tok

    def _check_inputs(self, genai: Path) -> None:
        """The graph's inputs are exactly what genai_config.json's dims feed it (layers, KV heads, head size)."""
        from .bundle_schema import check_decoder_inputs

        got = {i.name: i.shape for i in self.session.get_inputs()}
        where = f"{genai}: field 'model.decoder"
        check_decoder_inputs(where, got, self.config)
        plain = {k for k in got if not k.startswith("past_key_values.")}
        if plain != {"input_ids", "attention_mask", "position_ids"}:
            raise BundleError(f"{genai}: the graph's inputs {sorted(plain)} are not the decoder's (input_ids, "
                              f"attention_mask, position_ids)")

    # ---- forward -----------------------------------------------------------------------------------------
    def empty_cache(self) -> list[np.ndarray]:
        z = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return [z] * (2 * self.n_layers)

    def forward(self, ids: Sequence[int], cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids: new tokens of one sequence; cache: 2*layers arrays (past). Returns (logits (S, V), new cache)."""
        feed = decoder_feed(ids, cache, self.context, self.vocab_size, self.n_layers)
        outs = self.session.run(None, feed)
        return outs[0][0], outs[1:]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self.forward(ids, self.empty_cache())[0].astype(np.float32)

    def prefill(self, ids: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the prompt in chunks of at most PREFILL_CHUNK tokens (bounds the activations and the [T, vocab]
        logits, as the planner's overhead formula assumes). Returns (last chunk's logits, cache)."""
        check_prompt(len(ids), self.context, "the bundle's context")
        cache = self.empty_cache()
        for start in range(0, len(ids), PREFILL_CHUNK):
            logits, cache = self.forward(ids[start:start + PREFILL_CHUNK], cache)
        return logits, cache

    def generate(self, ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_at_eos: bool = True,
                 on_token: Callable[[int], object] | None = None) -> tuple[list[int], dict]:
        """Greedy (temperature 0) or nucleus sampling. Returns (new ids, timings); timings["stop"] says why it
        stopped: "eos" (not included in the ids), "length", "context" (prompt + new tokens filled the context)
        or "cancelled" (`on_token` returned true)."""
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        logits, cache = self.prefill(ids)
        t_prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        out, stop = decode_loop(self.forward, logits, cache, max_new_tokens, temperature, top_p, rng,
                                self.eos if stop_at_eos else None, on_token, room=self.context - len(ids))
        t_decode = time.perf_counter() - t1
        n_dec = max(len(out) - 1, 0)
        return out, {"prefill_tokens": len(ids), "prefill_s": t_prefill,
                     "prefill_tok_s": len(ids) / t_prefill if t_prefill > 0 else 0.0,
                     "decode_tokens": n_dec, "decode_s": t_decode,
                     "decode_tok_s": n_dec / t_decode if t_decode > 0 and n_dec else 0.0,
                     "stop": stop, "total_tokens": len(ids) + len(out)}


def check_prompt(n_tokens: int, context: int, what: str) -> None:
    """A prompt must be non-empty and fit the context (`what` names the limit in the message)."""
    if n_tokens <= 0:
        raise BundleError("empty prompt: nothing to run")
    if n_tokens > context:
        raise BundleError(f"the prompt is {n_tokens} tokens, longer than {what} ({context} tokens); shorten it")


def decode_loop(forward: Callable, logits: np.ndarray, cache: list, max_new_tokens: int, temperature: float,
                top_p: float, rng: np.random.Generator, eos: int | None,
                on_token: Callable[[int], object] | None = None, room: int | None = None) -> tuple[list[int], str]:
    """Sample up to `max_new_tokens` after a prefill (`logits` of its last step), feeding each token back
    through `forward(ids, cache) -> (logits, cache)`. Returns (tokens, why it stopped):
      "eos"       `eos` was sampled (given when generation stops at EOS); it is not returned nor passed on;
      "length"    `max_new_tokens` produced;
      "context"   `room` tokens produced (what still fits the context after the prompt; None: no limit);
      "cancelled" `on_token(token)` returned a true value."""
    out: list[int] = []
    limit = max_new_tokens if room is None else min(max_new_tokens, max(room, 0))
    while len(out) < limit:
        nxt = sample(logits[-1], temperature, top_p, rng)
        if eos is not None and nxt == eos:
            return out, "eos"
        out.append(nxt)
        if on_token and on_token(nxt):
            return out, "cancelled"
        if len(out) < limit:
            logits, cache = forward([nxt], cache)
    return out, "length" if len(out) >= max_new_tokens else "context"


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def pool_matches(manifest: dict, pool_file: str | Path) -> None:
    """A --pool given with a bundle must name exactly the bundle's routed experts (the bundle cannot change them)."""
    from .bundle_schema import PoolFile
    from .schema import load_json, validate

    data = load_json(pool_file, BundleError, "pool file not found")
    layers = validate(data, PoolFile, str(pool_file), BundleError).layers
    remap = manifest["experts"]
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
