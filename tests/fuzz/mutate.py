"""Mutators that turn one valid input into hostile variants of it, structure-aware, driven by a `Rand` (hypothesis
draws in the short run, a seeded PRNG for the long campaign's volume; see `Rand`).

    json_text(doc)        the document with 1-4 structural edits (wrong types, missing or extra keys,
                          negative/huge/NaN numbers, deep nesting, ../ and absolute paths, swapped values,
                          known semantic traps such as a NaN rope factor), serialised, sometimes then damaged as
                          text (truncated, duplicate key, BOM, bad UTF-8, wrapped 100,000 deep)
    byte_mutant(data)     flips, truncations, extensions, insertions, overwritten ranges
    safetensors(data)     header edits re-encoded with the length prefix exact or off by +-1/+-8, overlapping
                          or shifted offsets, a duplicated key, a bad length prefix, a cut or grown data area
    dir_mutant(files)     any of the above on 1-3 files of a directory, or a file deleted, replaced by a symlink
                          (to a decoy copy outside the directory, or to /dev/zero), an unexpected file added, or
                          (bundles) an entry dropped from the manifest's `files`, the manifest sometimes re-hashed

Paths that point outside the input directory point at decoys: valid copies of the base files kept next to it
(`../decoy/NAME` and its absolute path), so a loader that follows one loads fine and is caught reading outside.
Nothing here recurses on generated data (a RecursionError would depend on the stack depth, and hypothesis needs
generation to be deterministic): deep nesting is spliced in as text by `_dumps`.
"""

from __future__ import annotations

import copy
import functools
import json
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

HUGE_INTS = [0, -1, 1, 2, 3, 7, 255, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**63,
             10**8, 10**12, 10**18, 10**30]
FLOATS = [0.0, -0.0, 0.5, -1.5, 1e-300, 1e300, 1e308, float("nan"), float("inf"), float("-inf")]
NUMERIC_EDITS = ["+1", "-1", "neg", "x1e6", "float", "str", "huge", "nan"]


@dataclass(frozen=True)
class Ctx:
    """What strategies need to know about the run: where the decoys are and their names."""

    decoy_abs: str  # absolute path of the decoy directory
    decoy_rel: str  # the same, relative to the input directory ("../decoy")
    names: tuple[str, ...]  # file names available as decoys

    @functools.cache
    def path_attacks(self) -> tuple[str, ...]:
        out = ["", ".", "./", "..", "../", "~/x", "a\0b", "sub/dir/x", "x" * 300, "C:\\x", "\\\\srv\\x", "/dev/zero",
               "../../../../../../dev/zero", "%2e%2e/x", "a/./../../x"]
        for n in self.names:
            out += [f"{self.decoy_rel}/{n}", f"{self.decoy_abs}/{n}", f"./{self.decoy_rel}/{n}", f"sub/../{n}"]
        return tuple(out)


class Rand:
    """The randomness a mutator consumes. Two sources: `HypoRand` (hypothesis draws: the short run in the test
    suite, derandomized) and `PyRand` (a seeded random.Random: the long campaign's volume; hypothesis spends ~1 ms
    on each of a case's ~25 draws here). The mutators are the same."""

    def int(self, a: int, b: int) -> int: ...
    def float(self) -> float: ...
    def bytes(self, max_size: int, min_size: int = 0) -> bytes: ...
    def text(self, max_size: int) -> str: ...

    def bool(self) -> bool:
        return self.int(0, 1) == 1

    def pick(self, seq):
        seq = seq if isinstance(seq, (list, tuple)) else list(seq)
        return seq[self.int(0, len(seq) - 1)]


class HypoRand(Rand):
    def __init__(self, draw):
        self.draw = draw

    def int(self, a, b):
        return self.draw(st.integers(a, b))

    def float(self):
        return self.draw(st.floats())

    def bytes(self, max_size, min_size=0):
        return self.draw(st.binary(min_size=min_size, max_size=max_size))

    def text(self, max_size):
        return self.draw(st.text(max_size=max_size))


CHARS = "aZ09 _-./\\:\"'{}[]\0\n\t\u00e9\u202e\ud800\U0001f600"


class PyRand(Rand):
    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def int(self, a, b):
        return self.r.randint(a, b)

    def float(self):
        return self.r.choice(FLOATS) if self.r.random() < 0.3 else struct.unpack("<d", self.r.randbytes(8))[0]

    def bytes(self, max_size, min_size=0):
        return self.r.randbytes(self.r.randint(min_size, max_size))

    def text(self, max_size):
        return "".join(self.r.choice(CHARS) for _ in range(self.r.randint(0, max_size)))


def strategy(make) -> st.SearchStrategy:
    """A hypothesis strategy of `make(rand)`."""
    return st.composite(lambda draw: make(HypoRand(draw)))()


def _deep(depth: int) -> str:
    """A placeholder for a value nested `depth` lists deep, expanded by _dumps as text: nothing in a strategy
    may recurse on it (a RecursionError would depend on the stack depth, and hypothesis needs determinism)."""
    return f"__DEEP{depth}__"


_DEEP = re.compile(r'"__DEEP(\d+)__"')


def _small(r: Rand):
    k = r.int(0, 3)
    return None if k == 0 else r.bool() if k == 1 else r.int(-3, 40) if k == 2 else r.text(6)


def hostile(r: Rand, ctx: Ctx):
    """A value of the wrong type or an absurd one: None, bools, huge/negative ints, NaN/inf, strings, path
    attacks, small lists and dicts, deep nesting, empty containers."""
    k = r.int(0, 11)
    if k < 2:
        return None if k == 0 else r.bool()
    if k < 4:
        return r.pick(HUGE_INTS) if k == 2 else r.int(-2**70, 2**70)
    if k < 6:
        return r.pick(FLOATS) if k == 4 else r.float()
    if k < 8:
        return r.text(12) if k == 6 else r.pick(ctx.path_attacks())
    if k == 8:
        return [_small(r) for _ in range(r.int(0, 6))]
    if k == 9:
        return {r.text(6): _small(r) for _ in range(r.int(0, 3))}
    if k == 10:
        return _deep(r.pick([64, 65, 200, 5000]))
    return copy.deepcopy(r.pick([{}, [], "", [[]], {"": None}, [None]]))


def all_paths(doc, limit: int = 5000) -> list[tuple]:
    """Every (key/index) path into `doc`, breadth first, at most `limit`."""
    out, queue = [], [((), doc)]
    while queue and len(out) < limit:
        path, v = queue.pop(0)
        out.append(path)
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        queue.extend((path + (k,), c) for k, c in items)
    return out


def _parent(doc, path: tuple):
    """(container, key) of `path` in `doc`, or None when the path no longer exists (or is the document)."""
    if not path:
        return None
    cur = doc
    for k in path[:-1]:
        try:
            cur = cur[k]
        except (KeyError, IndexError, TypeError):
            return None
    if not isinstance(cur, (dict, list)):
        return None
    if isinstance(cur, dict) and path[-1] not in cur or isinstance(cur, list) and not (
            isinstance(path[-1], int) and path[-1] < len(cur)):
        return None
    return cur, path[-1]


def _numeric_edit(v, how: str):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return v
    return {"+1": lambda: v + 1, "-1": lambda: v - 1, "neg": lambda: -v - 1, "x1e6": lambda: v * 10**6,
            "float": lambda: float(v) + 0.5, "str": lambda: str(v), "huge": lambda: 10**8 * (v or 1),
            "nan": lambda: float("nan")}[how]()


NAN, INF = float("nan"), float("inf")
# (key, value) pairs a config.json may gain: the semantic traps of issue 14 (NaN rope factors, 10^8 layers, ...)
CONFIG_ITEMS = [
    ("rope_scaling", {"rope_type": "linear", "factor": NAN}), ("rope_scaling", {"type": "dynamic", "factor": INF}),
    ("rope_scaling", {"rope_type": "yarn", "factor": -4.0, "original_max_position_embeddings": 0}),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
    ("rope_scaling", {"rope_type": "longrope", "factor": 2.0}), ("rope_scaling", {"factor": 2.0}),
    ("num_hidden_layers", 10**8), ("num_experts", 10**8), ("num_experts_per_tok", 0), ("num_experts_per_tok", 9),
    ("num_experts_per_layer", [8, 10**8]), ("num_experts_per_layer", [8]), ("num_experts_per_layer", [0, 0]),
    ("num_shared_experts_per_layer", [9, 1]), ("always_active_experts", [0, 99]), ("always_active_experts", [-1]),
    ("always_active_experts_per_layer", [[0], [1, 2, 3, 4, 5, 6, 7, 8]]), ("head_dim", 0), ("head_dim", 7),
    ("num_key_value_heads", 3), ("num_attention_heads", 0), ("rms_norm_eps", NAN), ("rope_theta", -1.0),
    ("rope_theta", INF), ("max_position_embeddings", 10**12), ("dense_intermediate_size", -1),
    ("vocab_size", 10**10), ("hidden_size", 2**40), ("tie_word_embeddings", "yes"), ("model_type", "llama"),
]
EXTRA_ITEMS = {"config.json": CONFIG_ITEMS}


def _at(doc, path: tuple):
    for k in path:
        doc = doc[k]
    return doc


def json_doc(r, doc, ctx: Ctx, paths: list[tuple], extra_keys: tuple[str, ...] = (), extra_items=()):
    """`doc` with 1-4 structural edits; path attacks go to string values (file names live there)."""
    doc = copy.deepcopy(doc)
    str_paths = [p for p in paths if p and isinstance(_at(doc, p), str)] or paths
    for _ in range(r.int(1, 4)):
        op = r.int(0, 8)
        if op == 8 and extra_items and isinstance(doc, dict):
            key, value = r.pick(extra_items)
            doc[key] = copy.deepcopy(value)
            continue
        path = r.pick(str_paths if op in (4, 7) else paths)
        if not path:  # the whole document
            if op == 0:
                doc = hostile(r, ctx)
            continue
        loc = _parent(doc, path)
        if loc is None:
            continue
        parent, key = loc
        if op == 0:
            parent[key] = hostile(r, ctx)
        elif op == 1:
            del parent[key]
        elif op == 2:
            parent[key] = _numeric_edit(parent[key], r.pick(NUMERIC_EDITS))
        elif op == 3 and isinstance(parent, dict):
            parent[r.pick(extra_keys) if extra_keys else r.text(8)] = hostile(r, ctx)
        elif op == 4:
            parent[key] = r.pick(ctx.path_attacks())
        elif op == 5:
            other = _parent(doc, r.pick(paths))
            if other is not None:
                parent[key] = copy.deepcopy(other[0][other[1]])
        elif op == 6 and isinstance(parent[key], list):
            lst = parent[key]
            how = r.int(0, 2)
            parent[key] = lst + lst[-1:] if how == 0 else lst[:-1] if how == 1 else lst[::-1]
        elif op == 7 and isinstance(parent[key], str):
            parent[key] = parent[key] + r.pick(["/../x", "\0", "/", " ", "\u202e", ".." * 3])
    return doc


def _dumps(doc) -> str:
    try:
        text = json.dumps(doc, allow_nan=True)
    except ValueError:  # an integer too long for str()
        text = json.dumps(str(type(doc)))
    return _DEEP.sub(lambda m: "[" * int(m.group(1)) + "0" + "]" * int(m.group(1)), text)


def text_damage(r, text: str, first_key: str | None):
    """JSON text damaged below the structure: cut, wrapped very deep, a duplicated key, a BOM, bad UTF-8."""
    op = r.int(0, 7)
    raw = text.encode()
    if op == 0:
        return raw[: r.int(0, max(0, len(raw) - 1))]
    if op == 1:
        n = r.pick([65, 1000, 100_000])
        return ('{"a":' * n + text + "}" * n).encode() if r.bool() else ("[" * n + text + "]" * n).encode()
    if op == 2 and first_key is not None and text.startswith("{"):
        return ("{" + json.dumps(first_key) + ": " + r.pick(["null", "-1", "[]", "NaN", "1e999"]) +
                ", " + text[1:]).encode()
    if op == 3:
        return b"\xef\xbb\xbf" + raw
    if op == 4 and raw:
        i = r.int(0, len(raw) - 1)
        return raw[:i] + r.pick([b"\xff", b"\xc3", b"\x00", b"\n", b"\"", b"}", b"]"]) + raw[i + 1:]
    if op == 5:
        return raw + r.pick([b" garbage", b"{}", b"\x00" * 8, b"\n" + raw])
    if op == 6:
        return r.pick([b"", b"null", b"[]", b"1", b"\"x\"", b"NaN", b"-Infinity", b"9" * 5000])
    return raw


def json_text(r, doc, ctx: Ctx, paths: list[tuple] | None = None, extra_keys: tuple[str, ...] = (),
              extra_items=()):
    """Bytes of a hostile variant of the JSON document `doc`."""
    paths = paths if paths is not None else all_paths(doc)
    if r.int(0, 9) == 0:  # unchanged structure, damaged text
        mutant = doc
    else:
        mutant = json_doc(r, doc, ctx, paths, extra_keys, extra_items)
    text = _dumps(mutant)
    if r.int(0, 3) == 0:
        first = next(iter(mutant)) if isinstance(mutant, dict) and mutant else None
        return text_damage(r, text, first)
    return text.encode()


def byte_mutant(r, data: bytes):
    data = bytearray(data)
    n = len(data)
    for _ in range(r.int(1, 3)):
        op = r.int(0, 4)
        pos = r.int(0, max(0, len(data) - 1))
        if op == 0 and data:
            for _ in range(r.int(1, 8)):
                i = r.int(0, len(data) - 1)
                data[i] ^= r.int(1, 255)
        elif op == 1:
            del data[pos:]
        elif op == 2:
            data += bytes(r.pick([1, 7, 4096])) if r.bool() else r.bytes(64)
        elif op == 3:
            data[pos:pos] = r.bytes(16, 1)
        elif op == 4:
            k = r.int(1, 4096)
            data[pos:pos + k] = r.pick([b"\xff", b"\x00", b"\x7f"]) * min(k, max(0, len(data) - pos))
    if n and not data and r.bool():
        data = bytearray(b"\x00")
    return bytes(data)


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def safetensors(r, raw: bytes, ctx: Ctx):
    """A hostile variant of a valid safetensors file."""
    header, data = split_safetensors(raw)
    names = [k for k in header if k != "__metadata__"]
    op = r.int(0, 6)
    if op == 0:
        return byte_mutant(r, raw)
    if op == 1:  # only the length prefix
        (n,) = struct.unpack("<Q", raw[:8])
        m = r.pick([n + 1, n - 1, n + 8, n - 8, 0, 2**63, 2**64 - 1, len(raw), len(raw) - 7])
        return struct.pack("<Q", m % 2**64) + raw[8:]
    if op == 2:  # the data area cut or grown
        d = r.pick([-1, 1, -4096, 4096, -len(data)])
        data = data[:d] if d < 0 else data + bytes(d)
    elif op == 3:  # overlapping / shifted / swapped offsets, or another dtype
        a, b = r.pick(names), r.pick(names)
        how = r.int(0, 3)
        if how == 0:
            header[b] = dict(header[b], data_offsets=list(header[a]["data_offsets"]))
        elif how == 1:
            shift = r.pick([1, -1, 2, 8])
            for k in names:
                header[k] = dict(header[k], data_offsets=[o + shift for o in header[k]["data_offsets"]])
        elif how == 2:
            header[a], header[b] = dict(header[a], data_offsets=header[b]["data_offsets"]), \
                dict(header[b], data_offsets=header[a]["data_offsets"])
        else:
            header[a] = dict(header[a], dtype=r.pick(["F64", "I8", "BF16", "F16", "F32", "bool", ""]))
    elif op in (4, 5):
        header = json_doc(r, header, ctx, all_paths(header), ("__metadata__", names[0] + ".x"))
    text = _dumps(header).encode()
    if op == 6 and names:  # a duplicated key: the last entry wins in json.loads
        text = b'{' + json.dumps(names[0]).encode() + b': ' + _dumps(header[names[-1]]).encode() + b', ' + text[1:]
    text += b" " * r.pick([0, 0, 3, 8])
    delta = r.pick([0, 0, 0, 0, 1, -1, 8, -8])
    return struct.pack("<Q", max(0, len(text) + delta)) + text + data


def content_mutant(r: Rand, name: str, raw: bytes, ctx: Ctx) -> bytes:
    """A structure-aware mutant of a file, chosen by its name and content (a third of the time bytes only)."""
    if r.int(0, 2) == 0:
        return byte_mutant(r, raw)
    if name.endswith(".safetensors"):
        return safetensors(r, raw, ctx)
    if name.endswith(".json"):
        return json_text(r, json.loads(raw), ctx, extra_items=EXTRA_ITEMS.get(Path(name).name, ()))
    if name.endswith(".jsonl"):
        return jsonl(r, raw, ctx)
    return byte_mutant(r, raw)


def jsonl(r, raw: bytes, ctx: Ctx):
    """A JSON-lines file with one line edited structurally, or damaged as bytes, or one absurdly long line."""
    lines = [x for x in raw.decode().splitlines() if x.strip()]
    op = r.int(0, 4)
    if op == 0 and lines:
        i = r.int(0, len(lines) - 1)
        lines[i] = json_text(r, json.loads(lines[i]), ctx, extra_keys=("text", "meta")).decode("utf-8", "replace")
        return "\n".join(lines).encode()
    if op == 1:
        size = r.pick([1 << 16, (1 << 20) + 1, 4 << 20])
        doc = json.dumps({"text": r.pick(["a", "x ", "1+", "\u00e9"]) * size})
        return doc.encode() + b"\n" + raw
    if op == 2:
        return r.pick([b"", b"\n\n", b"{}", b'{"text": ""}', b'{"text": 1}', b"[" * 5000,
                           b'{"text": "' + b"\\ud800" * 4 + b'"}'])
    return byte_mutant(r, raw)


def redirect(r: Rand, m: dict, ctx: Ctx) -> None:
    """The attack of issue 14 item 1 on a manifest: a file name the manifest uses (a segment, router, shard or
    template) pointed at the decoy copy outside the bundle, with a `files` entry for the new name whose size and
    sha256 are right (the decoy has the same bytes): only path containment can refuse it."""
    names = [p for p in all_paths(m)
             if p and p[0] != "files" and isinstance(_at(m, p), str) and _at(m, p) in m["files"]]
    if not names:
        return
    path = r.pick(names)
    old = _at(m, path)
    new = r.pick([f"{ctx.decoy_rel}/{old}", f"{ctx.decoy_abs}/{old}", f"sub/../{ctx.decoy_rel}/{old}"])
    parent = _at(m, path[:-1])
    parent[path[-1]] = new
    m["files"][new] = dict(m["files"][old])


def dir_mutant(r, files: dict[str, bytes], ctx: Ctx, manifest: bool, always_rehash: bool = False,
               only: tuple[str, ...] | None = None, escape: bool = True):
    """A case for a whole directory: {"files": {name: bytes | {"symlink": target} | None}, "rehash": bool}.
    escape=False: no symlinks out of the directory (a file the user names may be a link to anywhere)."""
    names = sorted(only or files)
    out: dict = {}
    for _ in range(r.int(1, 3)):
        name = r.pick(names)
        op = r.int(0, 9)
        if op <= 5:  # a file this case already mutated is mutated further as bytes only (never re-parsed)
            cur = out.get(name)
            out[name] = byte_mutant(r, cur) if isinstance(cur, bytes) else content_mutant(r, name, files[name], ctx)
        elif op == 6:
            out[name] = None
        elif op == 7:
            links = [f"{ctx.decoy_abs}/{name}", f"{ctx.decoy_rel}/{name}", ctx.decoy_abs] if escape else []
            out[name] = {"symlink": r.pick(links + ["/dev/zero", r.pick(names)])}
        elif op == 8 and manifest and "manifest.json" in files:
            if "manifest.json" in out:  # already mutated: never re-parsed
                continue
            m = json.loads(files["manifest.json"])
            listed = sorted(m["files"]) if isinstance(m, dict) and isinstance(m.get("files"), dict) else []
            if listed and r.bool():
                del m["files"][r.pick(listed)]
            elif listed:
                redirect(r, m, ctx)
            out["manifest.json"] = json.dumps(m).encode()
        else:
            extra = r.pick(["pytorch_model.bin", ".hidden", "model.onnx_data", "x.safetensors"])
            out[extra] = r.bytes(64)
    rehash = always_rehash or (manifest and r.bool())
    return {"files": out, "rehash": rehash}
