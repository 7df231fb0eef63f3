"""The pool-aware scheduler: one worker thread owns the engine (as llama.cpp's server context owns its model);
HTTP handlers only submit jobs and read their events.

```
 submit(job) ──▶ pending (arrival order) ──worker: resolve auto pools, pick──▶ use(pool) ──▶ generate ──▶ events
```

The rule (`pick`), with grouping on:
  1. a job that has been passed over `k` times (k later arrivals served before it) is served next, the oldest
     such job first;
  2. otherwise the oldest job for the resident pool;
  3. otherwise the oldest job (its pool is swapped in).
Each time a job is served, every job still waiting that arrived before it counts one more pass. So no job waits
behind more than k others that arrived after it. With grouping off the oldest job is always next (FIFO).

Jobs run one after another: on this CPU runtime batching is not measured faster (the decode step is one sequence
through onnxruntime; two sequences would share no work), so a job on the resident pool simply goes next. A swap
therefore only ever happens between jobs: no running job needs the resident pool, and no job runs on a
half-swapped pool (the runtime's `use` returns when the pool is fully resident).
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from ..errors import EmoEdgeError
from ..engine import Completion, Engine, Sampling

log = logging.getLogger(__name__)


class QueueFull(EmoEdgeError):
    """More jobs waiting than the server accepts."""


@dataclass(eq=False)
class Job:
    """One generation request. `pool` None = auto (chosen by the engine from `choose_on`, default `ids`).
    Callbacks run on the worker thread: `on_start(pool, swapped, swap_ms)`, `on_token(id) -> stop?`,
    `on_done(Completion)`, `on_error(exc)`; exactly one of on_done / on_error is called."""

    ids: list[int]
    pool: str | None
    sampling: Sampling
    on_start: Callable[[str, bool, float], None] = lambda *a: None
    on_token: Callable[[int], bool] = lambda t: False
    on_done: Callable[[Completion], None] = lambda g: None
    on_error: Callable[[BaseException], None] = lambda e: None
    choose_on: list[int] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    seq: int = 0
    passed: int = 0


def pick(pending: list[Job], resident: str | None, k: int, grouping: bool) -> Job:
    """The next job by the module's rule; `pending` is in arrival order, every pool resolved."""
    if not grouping:
        return pending[0]
    starved = next((j for j in pending if j.passed >= k), None)
    if starved is not None:
        return starved
    return next((j for j in pending if j.pool == resident), pending[0])


class Scheduler:
    """Owns `engine` on one worker thread. `k`: the aging bound; `grouping` False: FIFO (for comparison)."""

    def __init__(self, engine: Engine, k: int = 4, grouping: bool = True, max_queue: int = 1024,
                 observer=None, start: bool = True):
        self.engine, self.k, self.grouping, self.max_queue = engine, k, grouping, max_queue
        self.observer = observer
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closing = False
        self._running: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="emo-edge-scheduler", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the most this server queues); retry")
            job.seq = next(self._seq)
            self._pending.append(job)
            self._cond.notify()

    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            left, self._pending = self._pending, []
            if self._running is not None:  # stop the generation in flight at its next token
                self._running.cancelled.set()
            self._cond.notify()
        for job in left:
            job.on_error(QueueFull("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    # ---- the worker ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                unresolved = [j for j in self._pending if j.pool is None and not j.cancelled.is_set()]
            for job in unresolved:  # the chooser runs the prompt through the backbone: outside the lock
                self._resolve(job)
            job = self._next()
            if job is not None:
                try:
                    self._run(job)
                finally:
                    with self._cond:
                        self._running = None

    def _resolve(self, job: Job) -> None:
        try:
            job.pool = self.engine.choose(job.choose_on or job.ids)
        except Exception as exc:  # noqa: BLE001 - reported to the request; the server keeps serving
            self._drop(job)
            self._fail(job, exc)

    def _drop(self, job: Job) -> None:
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)

    def _next(self) -> Job | None:
        """Take the next job by `pick` (cancelled ones are dropped); counts the passes."""
        with self._cond:
            for j in [j for j in self._pending if j.cancelled.is_set()]:
                self._pending.remove(j)
                j.on_error(EmoEdgeError("cancelled: the client went away"))
            ready = [j for j in self._pending if j.pool is not None]
            if not ready:
                return None
            job = pick(ready, self.engine.resident_pool(), self.k, self.grouping)
            self._pending.remove(job)
            for j in self._pending:
                if j.seq < job.seq:
                    j.passed += 1
            self._running = job
            return job

    def _run(self, job: Job) -> None:
        try:
            swapped = job.pool != self.engine.resident_pool()
            st = self.engine.use(job.pool) if swapped else None
            swap_ms = 0.0 if st is None or st.noop else st.seconds * 1e3
            if swapped and self.observer:
                self.observer.on_swap(swap_ms)
            job.on_start(job.pool, swapped, swap_ms)
            gen = self.engine.generate(job.ids, job.pool, job.sampling,
                                       lambda t: job.cancelled.is_set() or bool(job.on_token(t)))
        except Exception as exc:  # noqa: BLE001 - reported to the request; the server keeps serving
            self._fail(job, exc)
            return
        if job.cancelled.is_set():
            gen.stop = "abandoned"  # the client went away
        if self.observer:
            self.observer.on_done(self.engine, gen)
        job.on_done(gen)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if not isinstance(exc, EmoEdgeError):
            log.exception("request failed", exc_info=exc)
        if self.observer:
            self.observer.on_error(exc)
        job.on_error(exc)
