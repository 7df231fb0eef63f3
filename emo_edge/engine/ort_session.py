"""onnxruntime sessions on the CPU provider: no provider fallback, and no weight page resident twice.

Fallback. On a load failure, onnxruntime's Python wrapper prints four "EP Error ... Falling back ... retrying"
lines to *stdout* and loads the same model again on the same CPU provider. For a crafted bundle that is junk in the
generated-text stream and a second wasted load before our one-line error. The fallback flag is cleared before
the session is created (onnxruntime's own attribute; should a later version rename it, the override is simply
never called and the old behaviour returns).

Residency (measured with `python bench/residency.py stages`, onnxruntime 1.32 CPU EP, int4 bundles at the
emo-14b width). The session memory-maps the graph's external data. The weights it prepacks (MatMulNBits, QMoE at
accuracy_level 4) are copied into its own buffers in MLAS's layout and their mappings released, but their block
scales stay mapped (folded into the packed copy, yet still node inputs) with every page prepacking read still
resident, and are never read again: 7-11 % of the file bytes at block 64 (1-16 layers), 19 % at block 32.
`cpu_session` drops those pages once the session exists (madvise DONTNEED on this process's mappings of the
graph's own external-data files, where they hold no copy-on-write page; a page that onnxruntime does read later,
an embedding row say, comes back from the page cache on first touch, so only RSS changes) and hands freed heap
back to the kernel (malloc_trim). Decode speed is unchanged (0.99-1.07x, same greedy tokens). What stays is
MLAS's packed layout itself: one float32 scale and one float32 block sum per block (5.0 bits/weight at block 64
against 4.5 in the file), and the embedding rows a prompt touched.
Device side: onnxruntime (and onnx, to read the graph's external-data locations) only."""

from __future__ import annotations

import ctypes
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

_SESSION = None
_MADV_DONTNEED = 4
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ [0-9a-f]+ \S+ \d+\s*(.*)$")


def session_options(threads: int | None = None):
    """The static engine's onnxruntime session options: `threads` intra-op threads (None/0: onnxruntime's
    default, one per core), no inter-op pool, errors only in the log. The intra-op threads keep spinning between
    the nodes of one run (onnxruntime's default; turning it off measured 0.92x decode at prompt 128 on a
    16-layer int4 bundle, `python bench/variants.py`); the swappable engine's segments turn it off themselves."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def cpu_session(model, options, release: bool = True):
    """`onnxruntime.InferenceSession(model, options)` on the CPU provider; load errors raise once, print nothing.
    For a graph given as a path, `release` drops the pages of its external data that loading left resident
    (see the module docstring)."""
    global _SESSION
    if _SESSION is None:
        import onnxruntime as ort

        class NoFallbackSession(ort.InferenceSession):
            def _create_inference_session(self, *args, **kwargs):
                self._enable_fallback = False
                return super()._create_inference_session(*args, **kwargs)

        _SESSION = NoFallbackSession
    session = _SESSION(model, options, providers=["CPUExecutionProvider"])
    if release and isinstance(model, (str, os.PathLike)):
        release_external_data(Path(model))
    return session


def release_external_data(graph: Path) -> int:
    """Drop from this process the resident pages of its mappings of `graph`'s external-data files, then trim the
    heap. Only mappings without copy-on-write pages are touched (onnxruntime maps private and writable, but never
    writes), so nothing but residency changes; the mappings themselves stay. Returns the bytes that were resident in them. Linux only; elsewhere a no-op."""
    try:
        from ..bundle.schema import onnx_external_files

        graph = Path(graph).resolve()
        files = {str((graph.parent / loc).resolve()) for loc in onnx_external_files(graph) if loc}
    except Exception as exc:  # noqa: BLE001 - the session exists, so the graph is readable; never fail a load here
        log.debug("external data of %s not released: %s", graph, exc)
        return 0
    if not files:
        return 0
    dropped = 0
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for start, end, rss in _clean_mappings(files):
            if rss and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
                dropped += rss
        libc.malloc_trim(0)
    except (OSError, AttributeError) as exc:  # no /proc or no glibc: keep the pages
        log.debug("external data of %s not released: %s", graph, exc)
    return dropped


def _clean_mappings(files: set[str]) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of each mapping in /proc/self/smaps of one of `files` that holds no anonymous
    (copy-on-write) page: there, DONTNEED is a pure eviction (the pages are the file's, as in the page cache)."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            m = _MAPPING.match(line)
            if m:
                if cur is not None:
                    out.append(cur)
                cur = [int(m[1], 16), int(m[2], 16), 0] if m[3].strip() in files else None
            elif cur is not None:
                if line.startswith("Rss:"):
                    cur[2] = int(line.split()[1]) * 1024
                elif line.startswith("Anonymous:") and int(line.split()[1]):
                    cur = None
    if cur is not None:
        out.append(cur)
    return [tuple(c) for c in out]
