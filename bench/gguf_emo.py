"""Write an EMO checkpoint as a llama.cpp GGUF, for benchmarking emo-edge against llama.cpp on the same weights.

Runs in the llama.cpp benchmark venv, never in emo-edge's own environment (gguf and llama-cpp-python are
benchmark-only dependencies):

    python3.11 -m venv /tmp/llama/venv && CMAKE_BUILD_PARALLEL_LEVEL=1 CMAKE_ARGS="-DGGML_NATIVE=ON" \
        /tmp/llama/venv/bin/pip install --no-cache-dir llama-cpp-python gguf numpy
    /tmp/llama/venv/bin/python bench/gguf_emo.py write CKPT emo-bf16.gguf          # lossless: source dtype
    /tmp/llama/venv/bin/python bench/gguf_emo.py quantize emo-bf16.gguf emo-q4_0.gguf [--type q4_0] [--pure]
    /tmp/llama/venv/bin/python bench/gguf_emo.py info emo-q4_0.gguf                # tensor bytes as JSON

Architecture: llama.cpp's `bailingmoe` (Ling / BailingMoeForCausalLM), the closest match to EMO with a
shared expert. Its layer is EMO's exactly: pre-norm RMSNorm, GQA attention with RoPE and scale
1/sqrt(head_dim), no biases, RMSNorm, then `build_moe_ffn` over the routed experts (softmax over all routed
experts, top-k, weights taken from that softmax, renormalised only when `expert_weights_norm`, scaled by
`expert_weights_scale` = 1.0) plus an UNGATED shared expert added with weight 1 (src/models/bailingmoe.cpp,
src/llama-graph.cpp build_moe_ffn, llama.cpp master). EMO with one shared expert is that: the shared expert's
own softmax over one logit is exactly 1, the routed softmax runs over the routed experts only, top-(k - 1)
routed, `norm_topk_prob` maps to `expert_weights_norm`. Rejected: `qwen2moe` gates the shared expert with
sigmoid(x.w) computed as silu(t)/t, so the "zero gate weights and down_proj x 2" trick gives 0/0 = NaN;
`olmoe` has no shared expert (it would cost an 8th routed slot at top-8). bailingmoe uses llama.cpp's
NORM (interleaved-pair) RoPE, so q and k rows are permuted per head from the HF rotate-half layout, exactly
as convert_hf_to_gguf's BailingMoeModel.permute does: a row permutation, no arithmetic.

What is written (`write`): the checkpoint's own dtype (bf16/fp16/fp32) for every matrix, bit for bit (the
experts stacked as ffn_{gate,up,down}_exps (routed) and ffn_*_shexp (the shared one)), float32 for the
norms and the router (routed rows only; the shared expert's router row is unused: its weight is always 1),
and the checkpoint's byte-level BPE tokenizer (tokenizer.json) padded with [PADn] tokens to vocab_size as
convert_hf_to_gguf does. `quantize` is llama.cpp's own llama-quantize (llama_model_quantize): at Q4_0 it
writes every 2-D weight as Q4_0 (4.5 bits per weight: 32 4-bit codes + one fp16 scale), the token
embedding included, except output.weight, which llama-quantize promotes to Q6_K (6.56 bits), and the router,
kept float32; `--pure` makes output.weight Q4_0 too. That is what a llama.cpp user gets from
`llama-quantize model.gguf out.gguf Q4_0`.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

MAX_HEADER = 100 << 20  # a safetensors header larger than this is refused
ST_DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}


class InputError(Exception):
    """Bad user input: one line naming the file and field, exit status 2."""


# ---- reading the checkpoint ---------------------------------------------------------------------------------
class SafeTensors:
    """The tensors of a safetensors file as read-only memory maps (header parsed as JSON, bounds checked)."""

    def __init__(self, path: Path):
        self.path, size = path, path.stat().st_size
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > min(MAX_HEADER, size - 8):
                raise InputError(f"{path}: header length {n} is larger than the file or {MAX_HEADER} bytes")
            header = json.loads(f.read(n))
        self.base, self.entries = 8 + n, {k: v for k, v in header.items() if k != "__metadata__"}
        for name, e in self.entries.items():
            if e.get("dtype") not in ST_DTYPES:
                raise InputError(f"{path}: tensor {name}: dtype {e.get('dtype')!r} (expected BF16, F16 or F32)")
            a, b = e["data_offsets"]
            want = ST_DTYPES[e["dtype"]][1] * int(np.prod(e["shape"], dtype=np.int64))
            if not 0 <= a <= b <= size - self.base or b - a != want:
                raise InputError(f"{path}: tensor {name}: data_offsets {a}..{b} do not fit its shape or the file")

    def raw(self, name: str) -> tuple[np.ndarray, str]:
        """(array of the stored bits: uint16 for BF16, float16/float32 otherwise, st dtype name)."""
        e = self.entries[name]
        dt, _ = ST_DTYPES[e["dtype"]]
        a, b = e["data_offsets"]
        arr = np.memmap(self.path, dtype=dt, mode="r", offset=self.base + a, shape=tuple(e["shape"]))
        return arr, e["dtype"]


class Checkpoint:
    """config.json + the safetensors shards of an EMO checkpoint directory."""

    def __init__(self, root: Path):
        self.root = root
        cfg_path = root / "config.json"
        if not cfg_path.is_file():
            raise InputError(f"{cfg_path}: not found (expected an EMO checkpoint directory)")
        self.cfg = json.loads(cfg_path.read_text())
        self.dims = check_config(self.cfg, str(cfg_path))  # before any shard is opened
        index = root / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else ["model.safetensors"])
        self.where: dict[str, SafeTensors] = {}
        for name in files:
            p = (root / name).resolve()
            if root.resolve() not in p.parents or not p.is_file():
                raise InputError(f"{root / name}: missing, or resolves outside the checkpoint directory")
            st = SafeTensors(p)
            self.where.update(dict.fromkeys(st.entries, st))

    def raw(self, name: str) -> tuple[np.ndarray, str]:
        if name not in self.where:
            raise InputError(f"{self.root}: tensor {name} missing")
        return self.where[name].raw(name)

    def f32(self, name: str) -> np.ndarray:
        arr, dt = self.raw(name)
        if dt == "BF16":  # bf16 -> f32 is exact: the bf16 bits are the top half of the f32
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(arr, dtype=np.float32)


def check_config(cfg: dict, where: str) -> dict:
    """The EMO routing variants bailingmoe represents exactly; anything else is refused by field."""
    def need(field, ok, expect):
        if not ok(cfg.get(field)):
            raise InputError(f"{where}: field {field!r} is {cfg.get(field)!r}; the bailingmoe GGUF needs {expect}")
    need("model_type", lambda v: v == "emo", "'emo'")
    need("num_shared_experts", lambda v: v == 1, "exactly 1 (the last expert, weight 1)")
    for field in ("num_experts_per_layer", "num_shared_experts_per_layer", "always_active_experts",
                  "always_active_experts_per_layer", "rope_scaling"):
        need(field, lambda v: v in (None, [], {}), "null")
    need("attention_bias", lambda v: not v, "false")
    need("tie_word_embeddings", lambda v: not v, "false")
    need("num_experts", lambda v: isinstance(v, int) and v >= 3, "an integer >= 3")
    need("num_experts_per_tok", lambda v: isinstance(v, int) and 2 <= v <= cfg["num_experts"], "2..num_experts")
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    return {"hidden": h, "layers": cfg["num_hidden_layers"], "heads": nh,
            "kv_heads": cfg.get("num_key_value_heads") or nh, "head_dim": cfg.get("head_dim") or h // nh,
            "ff": cfg["intermediate_size"], "routed": cfg["num_experts"] - 1, "routed_k": cfg["num_experts_per_tok"] - 1,
            "vocab": cfg["vocab_size"], "ctx": cfg.get("max_position_embeddings") or 4096,
            "eps": cfg.get("rms_norm_eps", 1e-6), "theta": cfg.get("rope_theta", 10000.0),
            "norm_topk": bool(cfg.get("norm_topk_prob")), "eos": cfg.get("eos_token_id"),
            "pad": cfg.get("pad_token_id")}


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp NORM (interleaved pairs) rows, per head (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- the tensor plan ----------------------------------------------------------------------------------------
def tensor_plan(ck: Checkpoint, d: dict) -> list[tuple[str, tuple[int, ...], str, object]]:
    """[(gguf name, numpy shape, stored type, producer)] in file order; a producer returns the stored bits
    (uint16 for BF16) and checks them against the planned shape and dtype."""
    h, ff, s, hd, dt = d["hidden"], d["ff"], d["routed"], d["head_dim"], d["dtype"]

    def load(name, shape):
        arr, got = ck.raw(name)
        if got != dt or tuple(arr.shape) != shape:
            raise InputError(f"{ck.root}: tensor {name}: {got} {list(arr.shape)}, expected {dt} {list(shape)}")
        return np.asarray(arr)

    def matrix(name, shape, transform=None):
        return (shape, dt, lambda: np.ascontiguousarray((transform or (lambda w: w))(load(name, shape))))

    def vector(name, shape, rows=None):
        def get():
            _ = load(name, shape if rows is None else (rows + 1, h))
            return np.ascontiguousarray(ck.f32(name)[:rows] if rows else ck.f32(name))
        return (shape, "F32", get)

    def stacked(i, proj, shape):
        one = shape[1:]
        return (shape, dt, lambda: np.stack([load(f"model.layers.{i}.mlp.experts.{j}.{proj}.weight", one)
                                             for j in range(s)]))  # (E, out, in)

    q, kv = d["heads"] * hd, d["kv_heads"] * hd
    plan = [("token_embd.weight", *matrix("model.embed_tokens.weight", (d["vocab"], h)))]
    for i in range(d["layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."  # the shared expert is the last one, index `s`
        plan += [
            (b + "attn_norm.weight", *vector(p + "pre_attention_layernorm.weight", (h,))),
            (b + "attn_q.weight", *matrix(p + "self_attn.q_proj.weight", (q, h), lambda w: permute_rope(w, d["heads"]))),
            (b + "attn_k.weight", *matrix(p + "self_attn.k_proj.weight", (kv, h),
                                          lambda w: permute_rope(w, d["kv_heads"]))),
            (b + "attn_v.weight", *matrix(p + "self_attn.v_proj.weight", (kv, h))),
            (b + "attn_output.weight", *matrix(p + "self_attn.o_proj.weight", (h, q))),
            (b + "ffn_norm.weight", *vector(p + "pre_feedforward_layernorm.weight", (h,))),
            (b + "ffn_gate_inp.weight", *vector(p + "mlp.gate.weight", (s, h), rows=s)),
            (b + "ffn_gate_exps.weight", *stacked(i, "gate_proj", (s, ff, h))),
            (b + "ffn_up_exps.weight", *stacked(i, "up_proj", (s, ff, h))),
            (b + "ffn_down_exps.weight", *stacked(i, "down_proj", (s, h, ff))),
            (b + "ffn_gate_shexp.weight", *matrix(p + f"mlp.experts.{s}.gate_proj.weight", (ff, h))),
            (b + "ffn_up_shexp.weight", *matrix(p + f"mlp.experts.{s}.up_proj.weight", (ff, h))),
            (b + "ffn_down_shexp.weight", *matrix(p + f"mlp.experts.{s}.down_proj.weight", (h, ff))),
        ]
    plan += [("output_norm.weight", *vector("model.norm.weight", (h,))),
             ("output.weight", *matrix("lm_head.weight", (d["vocab"], h)))]
    return plan


# ---- the tokenizer ------------------------------------------------------------------------------------------
def add_tokenizer(w, root: Path, d: dict) -> None:
    """The checkpoint's byte-level BPE (tokenizer.json) as a gpt2-type GGUF vocabulary of vocab_size tokens."""
    import gguf

    path = root / "tokenizer.json"
    tok = json.loads(path.read_text()) if path.is_file() else None
    if not tok or tok.get("model", {}).get("type") != "BPE":
        raise InputError(f"{path}: expected a byte-level BPE tokenizer.json")
    vocab = {i: t for t, i in tok["model"]["vocab"].items()}
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    for a in tok.get("added_tokens", []):
        vocab[a["id"]] = a["content"]
    if max(vocab) >= d["vocab"]:
        raise InputError(f"{path}: token id {max(vocab)} >= vocab_size {d['vocab']}")
    tokens, types = [], []
    for i in range(d["vocab"]):  # ids past the tokenizer pad the embedding (convert_hf_to_gguf's [PADn])
        tokens.append(vocab.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.NORMAL if i in vocab else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if d["eos"] is not None:
        w.add_eos_token_id(int(d["eos"]))
    if d["pad"] is not None:
        w.add_pad_token_id(int(d["pad"]))
    w.add_add_bos_token(False)


# ---- commands -----------------------------------------------------------------------------------------------
def write(ckpt: Path, out: Path, force: bool) -> None:
    """Stream the checkpoint into a GGUF of its own dtype: headers first, then one tensor at a time."""
    import gguf

    ck = Checkpoint(ckpt)
    d = ck.dims
    d["dtype"] = ck.raw("model.embed_tokens.weight")[1]
    plan = tensor_plan(ck, d)
    tmp = claim(out, force)
    try:
        w = gguf.GGUFWriter(None, "bailingmoe")
        w.add_name(ckpt.name)
        w.add_file_type({"BF16": gguf.LlamaFileType.MOSTLY_BF16, "F16": gguf.LlamaFileType.MOSTLY_F16,
                         "F32": gguf.LlamaFileType.ALL_F32}[d["dtype"]])
        w.add_context_length(d["ctx"])
        w.add_embedding_length(d["hidden"])
        w.add_block_count(d["layers"])
        w.add_feed_forward_length(d["ff"])
        w.add_head_count(d["heads"])
        w.add_head_count_kv(d["kv_heads"])
        w.add_key_length(d["head_dim"])
        w.add_value_length(d["head_dim"])
        w.add_rope_dimension_count(d["head_dim"])
        w.add_rope_freq_base(float(d["theta"]))
        w.add_layer_norm_rms_eps(float(d["eps"]))
        w.add_vocab_size(d["vocab"])
        w.add_leading_dense_block_count(0)
        w.add_expert_count(d["routed"])
        w.add_expert_used_count(d["routed_k"])
        w.add_expert_shared_count(1)
        w.add_expert_feed_forward_length(d["ff"])
        w.add_expert_weights_scale(1.0)
        w.add_expert_weights_norm(d["norm_topk"])
        add_tokenizer(w, ckpt, d)
        for name, shape, t, _ in plan:
            item = 4 if t == "F32" else 2
            nbytes = item * int(np.prod(shape))
            if t == "BF16":  # the stored bits travel as bytes
                w.add_tensor_info(name, (*shape[:-1], shape[-1] * 2), np.dtype(np.uint8), nbytes,
                                  raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                w.add_tensor_info(name, shape, np.dtype(np.float32 if t == "F32" else np.float16), nbytes)
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for k, (name, shape, t, get) in enumerate(plan):
            arr = get()
            w.write_tensor_data(arr.view(np.uint8) if t == "BF16" else arr)
            if k % 50 == 0 or k == len(plan) - 1:
                print(f"wrote {k + 1}/{len(plan)} tensors ({name})", file=sys.stderr, flush=True)
        w.close()
        publish(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB, bailingmoe, {d['dtype']})")


QUANT_TYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15}  # llama_ftype values (llama.h)


def quantize(src: Path, out: Path, qtype: str, pure: bool, threads: int, force: bool) -> None:
    """llama.cpp's llama-quantize on a GGUF written by `write`."""
    import llama_cpp

    if not src.is_file():
        raise InputError(f"{src}: not found (write it first: gguf_emo.py write CKPT {src})")
    tmp = claim(out, force)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.nthread, params.ftype, params.pure = threads, QUANT_TYPES[qtype], pure
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise InputError(f"{src}: llama_model_quantize failed (status {rc})")
        publish(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB, {qtype}{' pure' if pure else ''})")


def info(path: Path) -> dict:
    """Per tensor: ggml type, elements and bytes (what peers.py needs for bits/weight and bytes per token)."""
    import gguf

    if not path.is_file():
        raise InputError(f"{path}: not found")
    r = gguf.GGUFReader(str(path))
    field = lambda k: r.fields[k].contents() if k in r.fields else None  # noqa: E731
    arch = field("general.architecture")
    return {"file_bytes": path.stat().st_size, "architecture": arch,
            "experts": field(f"{arch}.expert_count"), "experts_used": field(f"{arch}.expert_used_count"),
            "layers": field(f"{arch}.block_count"),
            "tensors": {t.name: {"type": t.tensor_type.name, "elements": int(t.n_elements), "bytes": int(t.n_bytes)}
                        for t in r.tensors}}


def claim(out: Path, force: bool) -> Path:
    """A temporary beside `out`; `out` itself must not exist unless --force (and then only a .gguf file)."""
    if out.exists() or out.is_symlink():
        if not force or out.is_symlink() or not out.is_file() or out.suffix != ".gguf":
            raise InputError(f"{out}: exists; refusing to overwrite it (--force replaces a .gguf file)")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such directory")
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def publish(tmp: Path, out: Path) -> None:
    os.replace(tmp, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("write", help="checkpoint -> GGUF in the checkpoint's dtype")
    a.add_argument("ckpt", type=Path); a.add_argument("out", type=Path); a.add_argument("--force", action="store_true")
    a = sub.add_parser("quantize", help="GGUF -> quantized GGUF with llama.cpp's llama-quantize")
    a.add_argument("src", type=Path); a.add_argument("out", type=Path)
    a.add_argument("--type", default="q4_0", choices=sorted(QUANT_TYPES))
    a.add_argument("--pure", action="store_true", help="every 2-D weight at --type (output.weight included)")
    a.add_argument("--threads", type=int, default=2); a.add_argument("--force", action="store_true")
    a = sub.add_parser("info", help="tensor types and bytes as JSON")
    a.add_argument("path", type=Path)
    args = p.parse_args(argv)
    try:
        if args.cmd == "write":
            write(args.ckpt, args.out, args.force)
        elif args.cmd == "quantize":
            quantize(args.src, args.out, args.type, args.pure, args.threads, args.force)
        else:
            print(json.dumps(info(args.path)))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
