"""The decode session: one sequence's KV cache, preallocated, shared between past and present.

GroupQueryAttention writes the new tokens' keys and values into its `present` output and attends over
`seqlens_k + 1` positions of it. When `past_key_values.{i}.*` and `present.{i}.*` are bound (IOBinding) to the
same buffer of shape [1, kv_heads, capacity, head_dim], the kernel sees `past == present` and runs in its
`past_present_share_buffer` mode: a step appends only the new rows in place, instead of copying the whole cache
into a fresh present tensor (measured at 1k context: ~274 MB copied per token at the emo-14b width, half of the
step). The buffers are zero pages until written, so resident KV grows with the tokens held, not the capacity.

    with engine.serving(pool):
        s = engine.session(capacity=len(prompt) + 64)
        logits = s.prefill(prompt)          # chunks of `prefill_chunk`; logits (1, V) of the last token
        logits = s.feed([next_token])       # one decode step: (1, V)

Graphs whose attention is not GroupQueryAttention (the exporter's Concat attention, for head sizes the CPU kernel
does not take: `shares_kv`) grow their present by concatenation: for them the cache is a list of arrays replaced each step
(`shared=False`), the copy the shared mode avoids.

A graph runner (`Stages`) is what the engine supplies: the static engine one session, the swappable engine its
backbone segments with the active pool's MoE blocks between them. `decoder_feed` is the copy-based form of the
same inputs, for one-off passes that keep no session (the pool chooser's probe).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import BundleError

PLAIN_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS_TO_KEEP = "logits_to_keep"  # optional graph input (exporters/onnx.py): logits of the last n positions only
NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


def kv_names(i: int) -> tuple[str, str, str, str]:
    return (f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value")


def kv_dtype(sessions: Sequence, where: str) -> np.dtype:
    """The KV cache's element type: what the graphs declare for their past_key_values inputs (one type for all)."""
    types = {i.type for s in sessions for i in s.get_inputs() if i.name.startswith("past_key_values.")}
    if len(types) != 1 or next(iter(types)) not in NP_TYPES:
        raise BundleError(f"{where}: past_key_values inputs of type {sorted(types)}; expected one of "
                          f"{sorted(NP_TYPES)}")
    return np.dtype(NP_TYPES[types.pop()])


def shares_kv(head_dim: int) -> bool:
    """Whether the exporter's attention for this head size is GroupQueryAttention, which can write into its
    past buffer (the CPU kernel takes head_size % 16 == 0; other sizes get the Concat attention). Decided from the
    dims rather than by parsing the graphs, which would leave their protobuf in the budgeted RSS; a graph that
    breaks the rule fails its first run with a one-line BundleError."""
    return head_dim % 16 == 0


class KVCache:
    """Per layer a key and a value buffer. shared=True: [1, kv_heads, capacity, head_dim], each wrapped once in
    an OrtValue (no copy) that a binding gives as both past input and present output. shared=False: arrays
    [1, kv_heads, length, head_dim], replaced by each run's present outputs."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype=np.float32,
                 shared: bool = True):
        import onnxruntime as ort

        self.capacity, self.dtype, self.shared = capacity, np.dtype(dtype), shared
        rows = capacity if shared else 0
        self.arrays = [np.zeros((1, kv_heads, rows, head_dim), self.dtype) for _ in range(2 * n_layers)]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays] if shared else []
        self.length = 0  # positions held
        self.high = 0  # positions ever written (shared buffers: the rows that are resident pages)
        self._row_bytes = 2 * n_layers * kv_heads * head_dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the rows written so far (what the cache holds in RAM: unwritten rows are zero pages)."""
        return self.high * self._row_bytes

    def truncate(self, n: int) -> None:
        """Keep the first `n` positions: the next run writes from position n on (shared buffers are overwritten
        in place; the rows past n are never attended, the attention mask ends at the new length)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot keep {n} of {self.length} positions")
        if not self.shared:
            self.arrays = [a[:, :, :n] for a in self.arrays]
        self.length = n

    def bind(self, io, inputs: Sequence[str], outputs: Sequence[str]) -> int:
        """Bind the cache entries a graph has (by name, shared mode); returns how many outputs were bound."""
        ins, outs = set(inputs), set(outputs)
        n = 0
        if not self.shared:
            return 0
        for i in range(len(self.arrays) // 2):
            pk, pv, k, v = kv_names(i)
            for past, present, value in ((pk, k, self.values[2 * i]), (pv, v, self.values[2 * i + 1])):
                if past in ins:
                    io.bind_ortvalue_input(past, value)
                if present in outs:
                    io.bind_ortvalue_output(present, value)
                    n += 1
        return n


class BoundGraph:
    """One onnxruntime session bound to a KVCache: its cache inputs/outputs bound once, its other inputs bound
    from an environment of numpy arrays per run, its other outputs read back into it."""

    def __init__(self, session, kv: KVCache, inputs: Sequence[str], outputs: Sequence[str], what: str):
        self.session, self.what, self.kv = session, what, kv
        self.io = session.io_binding()
        n_kv = kv.bind(self.io, inputs, outputs)
        is_kv = lambda n: n.startswith(("past_key_values.", "present."))  # noqa: E731
        self.plain_in = [n for n in inputs if not kv.shared or not is_kv(n)]
        self.plain_out = [n for n in outputs if not kv.shared or not is_kv(n)]
        for n in self.plain_out:  # bound after the cache: get_outputs() lists them from position n_kv on
            self.io.bind_output(n)
        self.first_out = n_kv
        if LOGITS_TO_KEEP in self.plain_in:
            import onnxruntime as ort

            # env[LOGITS_TO_KEEP] says "last only"; 0 keeps every position
            self._keep = {flag: ort.OrtValue.ortvalue_from_numpy(np.array([int(flag)], np.int64))
                          for flag in (False, True)}

    def run(self, env: dict) -> None:
        io, kv = self.io, self.kv
        for n in self.plain_in:
            if n == LOGITS_TO_KEEP:  # an overridable initializer: bind_cpu_input looks it up among the inputs only
                io.bind_ortvalue_input(n, self._keep[env[n]])
                continue
            io.bind_cpu_input(n, env[n] if n in env else kv.arrays[_kv_index(n)])
        for n in self.plain_out:  # re-bound each run: their shapes follow the chunk
            io.bind_output(n)
        try:
            self.session.run_with_iobinding(io)
        except Exception as exc:  # onnxruntime raises its own types
            if kv.shared and "provided for output 'present." in str(exc):
                raise BundleError(f"{self.what}: its attention grows the KV cache by concatenation instead of "
                                  f"writing into it (not GroupQueryAttention, against the exporter's rule for "
                                  f"this head size)") from None
            raise run_error(self.what, exc) from None
        outs = io.get_outputs()
        for n, v in zip(self.plain_out, outs[self.first_out:]):
            if n.startswith("present."):  # unshared cache: the grown arrays replace the old ones
                kv.arrays[_kv_index(n)] = v.numpy()
            else:
                env[n] = v.numpy()


def _kv_index(name: str) -> int:
    """past_key_values.{i}.key / present.{i}.value ... -> the cache's array index (2i, 2i + 1)."""
    _, i, kind = name.split(".")
    return 2 * int(i) + (kind == "value")


def run_error(what: str, exc: Exception) -> BundleError:
    """onnxruntime's refusal of what a (crafted) bundle's graphs compute, as one line naming the graph."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return BundleError(f"{what}: onnxruntime failed running it ({msg})")


Stages = Callable[[dict], None]  # runs the decoder over env (inputs -> env["logits"]), cache bound inside


class DecodeSession:
    """One sequence: its KV cache and the engine's graphs bound to it. Not thread-safe (one caller at a time);
    the engine that made it must keep its pool resident while it is used (`Engine.serving`)."""

    def __init__(self, bind: Callable[[KVCache], Stages], n_layers: int, kv_heads: int, head_dim: int,
                 capacity: int, vocab_size: int, dtype=np.float32, prefill_chunk: int = 256, shared: bool = True):
        self.kv = KVCache(n_layers, kv_heads, head_dim, capacity, dtype, shared)
        self.run = bind(self.kv)
        self.vocab_size, self.prefill_chunk = vocab_size, prefill_chunk
        self._mask = np.ones((1, capacity), np.int64)

    @property
    def length(self) -> int:
        return self.kv.length

    @property
    def room(self) -> int:
        return self.kv.capacity - self.kv.length

    def truncate(self, n: int) -> None:
        """Forget all but the first `n` tokens held (the prefix cache reuses the rest)."""
        self.kv.truncate(n)

    def feed(self, ids: Sequence[int], last_only: bool = False) -> np.ndarray:
        """Run new tokens after those held; returns their logits (S, V) as float32, or (1, V) of the last token
        with `last_only` where the graph can skip the others (its `logits_to_keep` input; older bundles give
        all S rows)."""
        x = np.asarray(ids, np.int64).reshape(1, -1)
        past = self.kv.length
        total = past + x.shape[1]
        if not x.size:
            raise BundleError("no tokens to run")
        if total > self.kv.capacity:
            raise BundleError(f"sequence of {total} tokens exceeds the session's capacity {self.kv.capacity}")
        if x.min() < 0 or x.max() >= self.vocab_size:
            raise BundleError(f"token id outside the vocabulary [0, {self.vocab_size})")
        env = {"input_ids": x, "attention_mask": self._mask[:, :total],
               "position_ids": np.arange(past, total, dtype=np.int64)[None],
               LOGITS_TO_KEEP: last_only}
        self.run(env)
        self.kv.length = total
        self.kv.high = max(self.kv.high, total)
        logits = env["logits"][0]
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """The prompt in chunks of at most `prefill_chunk` tokens (bounds the activations, as the planner's
        overhead formula assumes); returns the last token's logits (1, V): the graph computes no others (older
        bundles without `logits_to_keep`: the last chunk's (T, V), of which the last row is the same)."""
        logits = None
        for a in range(0, len(ids), self.prefill_chunk):
            logits = None  # an older graph's [T, vocab] chunk logits (~100 MB at 14B width) not held over the next
            logits = self.feed(ids[a:a + self.prefill_chunk], last_only=True)
        if logits is None:
            raise BundleError("empty prompt: nothing to run")
        return logits


def decoder_feed(ids: Sequence[int], cache: list[np.ndarray], context: int, vocab_size: int,
                 n_layers: int) -> dict[str, np.ndarray]:
    """The decoder's inputs for new tokens `ids` after a cached past of 2*layers arrays [1, kvh, past, hd] (the
    copy-based form, for passes that keep no session)."""
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
