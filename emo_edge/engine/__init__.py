"""The device side's one engine: everything that runs a bundle (`run`, `chat`, `logits`, `serve`, the benches)
opens it with `open_engine` and uses the `Engine` API; static and swappable bundles are its two implementations.

```
 bundle dir ──open_engine (manifest checked, paths confined)──▶ Engine (StaticEngine | SwappableEngine)
   engine.generate(prompt, pool, Sampling(...), on_token) -> Completion    prefill + decode in one DecodeSession
   engine.logits(ids, pool) -> (S, V)                                      one forward pass
   with engine.serving(pool): s = engine.session(n)                        the pool resident; KV preallocated,
       s.prefill(ids); s.feed([tok])                                       past/present shared (no per-step copy)
   engine.use(pool) -> SwapStats                                           swappable: expert store + budget
   engine.choose_pool(ids, "auto"|"doc") -> (pool, why, scores)
```
Parts, one job each: session.py (KV buffers and graph bindings), sampler.py (sampling, the decode loop),
static.py, swappable/ (budget, expert store with its mapped and rebuild mechanisms, pool chooser, residency),
memory.py (RSS accounting). Device side: onnxruntime, numpy, tokenizers only (never torch).
"""

from .base import Engine, open_engine
from .sampler import Completion, Sampling, check_prompt, sample
from .session import DecodeSession, KVCache
from .static import StaticEngine
from .swappable import SwappableEngine, SwapStats, is_swappable

__all__ = ["Completion", "DecodeSession", "Engine", "KVCache", "Sampling", "StaticEngine", "SwapStats",
           "SwappableEngine", "check_prompt", "is_swappable", "open_engine", "sample"]
