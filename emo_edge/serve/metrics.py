"""GET /metrics: Prometheus text format (prometheus_client), one registry per server.

Counters and histograms are updated by the scheduler's worker (`on_swap`, `on_done`, `on_error`) and the HTTP
layer (`requests`); the engine's resident experts are snapshotted by the worker after each job (the engine is
only touched from its thread); RSS is read from /proc at scrape time."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  re-exported for the app

from ..engine.memory import peak_rss, rss

SWAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, budget: int | None = None):
        disable_created_metrics()  # no `_created` series: one line per number a reader wants
        r = self.registry = CollectorRegistry()
        self.requests = Counter("emo_edge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.tokens = Counter("emo_edge_generated_tokens", "Tokens generated", registry=r)
        self.decode_seconds = Counter("emo_edge_decode_seconds", "Seconds spent generating tokens", registry=r)
        self.tok_s = Gauge("emo_edge_tokens_per_second", "Decode tokens/s of the last finished request", registry=r)
        self.swaps = Counter("emo_edge_swaps", "Pool swaps", registry=r)
        self.swap_seconds = Histogram("emo_edge_swap_seconds", "Pool swap latency", buckets=SWAP_BUCKETS, registry=r)
        self.abandoned = Counter("emo_edge_abandoned_requests", "Generations cancelled because the client went away",
                                 registry=r)
        self.errors = Counter("emo_edge_generation_errors", "Requests that failed in the engine", registry=r)
        self.resident = Gauge("emo_edge_resident_experts", "Experts resident in memory (active + cached)",
                              registry=r)
        self.rss = Gauge("emo_edge_rss_bytes", "Process resident set size", registry=r)
        self.rss.set_function(rss)
        self.peak = Gauge("emo_edge_peak_rss_bytes", "Process peak resident set size (VmHWM)", registry=r)
        self.peak.set_function(peak_rss)
        self.budget = Gauge("emo_edge_budget_bytes", "The --budget (0: none)", registry=r)
        self.budget.set(budget or 0)
        self.queue = Gauge("emo_edge_queue_depth", "Requests waiting for the engine", registry=r)
        self.prefix = {k: Gauge(f"emo_edge_prefix_cache_{k}", what, registry=r) for k, what in (
            ("bytes", "KV cache bytes kept for later prompts"), ("max_bytes", "The prefix cache's bound (0: off)"),
            ("entries", "Sessions kept"), ("hits", "Prompts that reused a kept prefix"),
            ("misses", "Prompts that found no kept prefix"),
            ("tokens_reused", "Prompt tokens not prefilled thanks to the cache"),
            ("evictions", "Kept sessions dropped (bounds, swaps)"))}
        self._lock = threading.Lock()

    # ---- from the scheduler's worker -----------------------------------------------------------------------
    def on_swap(self, ms: float) -> None:
        self.swaps.inc()
        self.swap_seconds.observe(ms / 1e3)

    def on_done(self, engine, gen) -> None:
        self.tokens.inc(len(gen.ids))
        if gen.stop == "abandoned":
            self.abandoned.inc()
        self.decode_seconds.inc(gen.decode_s)
        if gen.decode_s > 0 and len(gen.ids) > 1:
            self.tok_s.set((len(gen.ids) - 1) / gen.decode_s)
        self.snapshot(engine)

    def on_error(self, exc: BaseException) -> None:
        self.errors.inc()

    def snapshot(self, engine) -> None:
        self.resident.set(engine.stats()["resident_experts"])
        cache = getattr(engine, "prefix_cache", None)  # an Engine's; test doubles may have none
        if cache is not None:
            for k, v in cache.stats().items():
                self.prefix[k].set(v)

    def render(self, queue_depth: int) -> bytes:
        self.queue.set(queue_depth)
        return generate_latest(self.registry)
