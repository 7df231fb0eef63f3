"""Loading an exported bundle on the device side: sha256 checks, the onnxruntime session, prefill/decode and
generation. Imports onnxruntime, numpy and tokenizers only (never torch)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import BundleError

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
    from .fsutil import read_json

    path = root / MANIFEST
    m = read_json(path, BundleError, f"missing: {root} is not a bundle")
    if not isinstance(m, dict) or m.get("schema_version") != SCHEMA_VERSION or not isinstance(m.get("files"), dict):
        raise BundleError(f"{path}: unsupported manifest (schema_version {m.get('schema_version')!r}, expected "
                          f"{SCHEMA_VERSION})" if isinstance(m, dict) else f"{path}: not a manifest")
    return m


def check_files(root: Path, manifest: dict) -> None:
    """Every file listed in the manifest exists and has its sha256."""
    for name, entry in sorted(manifest["files"].items()):
        p = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{root / MANIFEST}: file entry {name!r} points outside the bundle")
        if not p.is_file():
            raise BundleError(f"{p}: missing (listed in {MANIFEST})")
        if p.stat().st_size != entry.get("bytes"):
            raise BundleError(f"{p}: has {p.stat().st_size} bytes, manifest says {entry.get('bytes')} (corrupted)")
        if sha256_file(p) != entry.get("sha256"):
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

        self.root = Path(root)
        if verify_files and read_manifest(self.root).get("kind") == "swappable":
            raise BundleError(f"{self.root}: a swappable bundle (backbone + expert shards); run it with "
                              f"`emo-edge chat {self.root} --budget ...`")
        if verify_files:
            self.manifest = read_manifest(self.root)
            check_files(self.root, self.manifest)
        else:  # the exporter's own check of a bundle still being written (no manifest yet)
            self.manifest = {}
        try:
            self.config = json.loads((self.root / "genai_config.json").read_text())["model"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise BundleError(f"{self.root / 'genai_config.json'}: unreadable ({exc})") from None
        dec = self.config["decoder"]
        self.n_layers, self.kv_heads, self.head_dim = dec["num_hidden_layers"], dec["num_key_value_heads"], \
            dec["head_size"]
        self.vocab_size, self.context = self.config["vocab_size"], self.config["context_length"]
        self.eos = self.config.get("eos_token_id")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.root / dec["filename"]), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{self.root}: onnxruntime cannot load the model ({str(exc).splitlines()[0]})") from None
        self._tok = None

    # ---- tokenizer -------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tok is None:
            from .tokenizer import TextTokenizer
            self._tok = TextTokenizer(self.root / "tokenizer.json")
        return self._tok

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
        if not len(ids):
            raise BundleError("empty prompt: nothing to run")
        cache = self.empty_cache()
        for start in range(0, len(ids), PREFILL_CHUNK):
            logits, cache = self.forward(ids[start:start + PREFILL_CHUNK], cache)
        return logits, cache

    def generate(self, ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_at_eos: bool = True,
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], dict]:
        """Greedy (temperature 0) or nucleus sampling. Returns (new ids, timings)."""
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        logits, cache = self.prefill(ids)
        t_prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = decode_loop(self.forward, logits, cache, min(max_new_tokens, self.context - len(ids)), temperature,
                          top_p, rng, self.eos if stop_at_eos else None, on_token)
        t_decode = time.perf_counter() - t1
        n_dec = max(len(out) - 1, 0)
        return out, {"prefill_tokens": len(ids), "prefill_s": t_prefill,
                     "prefill_tok_s": len(ids) / t_prefill if t_prefill > 0 else 0.0,
                     "decode_tokens": n_dec, "decode_s": t_decode,
                     "decode_tok_s": n_dec / t_decode if t_decode > 0 and n_dec else 0.0}


def decode_loop(forward: Callable, logits: np.ndarray, cache: list, max_new_tokens: int, temperature: float,
                top_p: float, rng: np.random.Generator, eos: int | None,
                on_token: Callable[[int], None] | None = None) -> list[int]:
    """Sample up to `max_new_tokens` after a prefill (`logits` of its last step), feeding each token back
    through `forward(ids, cache) -> (logits, cache)`; stops after `eos` when given."""
    out: list[int] = []
    for step in range(max_new_tokens):
        nxt = sample(logits[-1], temperature, top_p, rng)
        out.append(nxt)
        if on_token:
            on_token(nxt)
        if (eos is not None and nxt == eos) or step == max_new_tokens - 1:
            break
        logits, cache = forward([nxt], cache)
    return out


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
    try:
        data = json.loads(Path(pool_file).read_text(encoding="utf-8"))
        layers = data["layers"]
    except FileNotFoundError:
        raise BundleError(f"{pool_file}: pool file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise BundleError(f"{pool_file}: not a pool file {{\"layers\": [...]}}") from None
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
