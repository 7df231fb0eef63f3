"""The prefix cache: decode sessions kept after a generation, so that a prompt starting with tokens a kept session
already holds (the earlier turns of a chat, a shared system prompt) prefills only the rest.

A kept session's KV cache was computed under one pool (the experts change every layer's hidden states after the
first), so an entry is keyed by the pool's name and only a request under that pool may take it; ad-hoc pools are
never kept. `take` removes the entry whose held tokens share the longest prefix with the prompt, cuts its cache
back to that prefix (at most the prompt's length minus one: the last prompt token is always run, for its logits)
and hands it over; `put` keeps a session again after its generation. Bounded in bytes (the KV rows each session has
written, the resident part: the buffers are zero pages beyond them) and in entries; least recently used out first.
Thread-safe: a taken session belongs to its caller alone.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

MIN_REUSE = 8  # a shorter common prefix is not worth a session's memory: start a fresh one


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Entry:
    pool: str
    held: list[int]  # the tokens whose keys and values the session holds, in order
    session: object  # DecodeSession

    @property
    def nbytes(self) -> int:
        return self.session.kv.resident_bytes


class PrefixCache:
    def __init__(self, max_bytes: int, max_entries: int = 16):
        self.max_bytes, self.max_entries = int(max_bytes), int(max_entries)
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.tokens_reused = self.evictions = 0

    def take(self, pool: str, ids: Sequence[int], capacity: int):
        """(session, tokens reused) for a prompt under `pool` that needs `capacity` tokens in all; (None, 0) when
        no kept session shares at least MIN_REUSE tokens with it and has the room."""
        with self._lock:
            best, best_n = None, 0
            for key, e in self._entries.items():
                if e.pool != pool or e.session.kv.capacity < capacity:
                    continue
                n = min(common_prefix(e.held, ids), len(ids) - 1)
                if n > best_n:
                    best, best_n = key, n
            if best is None or best_n < MIN_REUSE:
                self.misses += 1
                return None, 0
            e = self._entries.pop(best)
            self.hits += 1
            self.tokens_reused += best_n
        e.session.truncate(best_n)
        return e.session, best_n

    def put(self, pool: str, session, held: Sequence[int]) -> None:
        """Keep `session` (holding `held`) for later prompts under `pool`; evicts least recently used entries
        past the bounds (a session bigger than the whole cache is not kept)."""
        entry = Entry(pool, list(held[:session.length]), session)
        if entry.nbytes > self.max_bytes or not entry.held:
            return
        with self._lock:
            self._entries[self._next] = entry
            self._next += 1
            while len(self._entries) > self.max_entries or self._bytes() > self.max_bytes:
                self._entries.popitem(last=False)
                self.evictions += 1

    def drop_other_pools(self, pool: str | None) -> int:
        """Forget every entry not computed under `pool` (before a swap: their memory goes back first)."""
        with self._lock:
            gone = [k for k, e in self._entries.items() if e.pool != pool]
            for k in gone:
                del self._entries[k]
            self.evictions += len(gone)
            return len(gone)

    def clear(self) -> None:
        self.drop_other_pools(None)

    def _bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes(), "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "tokens_reused": self.tokens_reused,
                    "evictions": self.evictions}
