"""Pool choice: the prompt's router probabilities over every exported expert, probed through the resident
backbone (independent of the resident pool), and the catalog pool whose calibration profile they are closest to
(without profiles in the bundle: the pool they cover best), or an ad-hoc top-N pool."""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np

from ..session import DecodeSession
from ...errors import BundleError, PoolError


class Chooser:
    """SwappableEngine's pool chooser.

    Uses the runtime's segments, layers, pools, resolve() and (probe "active") the forward pass and lock."""

    # ---- pool choice ---------------------------------------------------------------------------------------
    def router_mass(self, ids: Sequence[int], probe: str = "backbone") -> list[np.ndarray]:
        """Per MoE layer: router probabilities [T, r_union] over all exported experts for the prompt.

        probe "backbone" (the chooser's): the prompt runs through the resident backbone with the shared and
        always-active experts only (each routed-expert block's output left out), so the routers see the same
        hidden states whatever pool is resident or came before; needs no pool loaded and takes no lock (the
        backbone and the routers never change). probe "active": through the active pool (the old chooser,
        history-dependent; kept to measure the difference, bench/auto_pool.py)."""
        if probe not in ("backbone", "active"):
            raise PoolError(f"router probe '{probe}': expected backbone or active")
        zs: list[list[np.ndarray]] = [[] for _ in self.layers]
        routed = probe == "active"
        session = DecodeSession(lambda kv: self._bind(kv, zs, routed=routed), self.n_layers, self.kv_heads,
                                self.head_dim, max(len(ids), 1), self.vocab_size, self.kv_dtype, self.prefill_chunk,
                                self.kv_shared)
        with (self.serving(None) if routed else contextlib.nullcontext()):
            session.prefill(ids)
        out = []
        for parts in zs:
            z = np.concatenate(parts).astype(np.float64)  # (T, r_union)
            p = np.exp(z - z.max(axis=1, keepdims=True))
            out.append(p / p.sum(axis=1, keepdims=True))
        return out

    def choose_pool(self, ids: Sequence[int], mode: str = "auto", probe: str = "backbone") -> tuple[object, str, dict]:
        """mode 'auto': the catalog pool with the highest router-mass coverage of the prompt (mean over MoE
        layers of the mean over tokens of the probability mass its experts get); 'doc': per layer the top-N
        experts of the prompt's router mass (N = the largest catalog pool's size in that layer, what the budget
        was checked for). Routers are probed independently of the resident pool (`router_mass`), so the same
        prompt gets the same pool whatever came before. Returns (pool name or per-layer lists, reason, scores)."""
        from ..sampler import check_prompt

        check_prompt(len(ids), self.context, "the bundle's context")
        probs = self.router_mass(ids, probe)
        how = "routers probed with the backbone and shared experts, independent of the resident pool" \
            if probe == "backbone" else f"routers probed with pool '{self.active_name}'"
        if mode == "doc":
            sizes = self._largest_pool()
            layers: list = [None] * self.n_layers
            counts = [max(len(size), L.meta["routed_k"]) for L, size in zip(self.layers, sizes)]
            for L, top in zip(self.layers, top_experts(probs, counts)):
                layers[L.layer] = sorted(L.ids[i] for i in top)
            cov = coverage(probs, [[L.pos[s] for s in layers[L.layer]] for L in self.layers])
            return layers, (f"ad-hoc per-layer top-N pool from the prompt ({[len(s) for s in sizes]} experts per "
                            f"layer), router-mass coverage {cov:.3f} ({how})"), {"doc": cov}
        profiles = self.router_profiles()
        if profiles is not None:
            best, scores = closest_profile(probs, {n: profiles[n] for n in self.pools})
            ranked = ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items(), key=lambda kv: -kv[1]))
            return best, (f"closest router profile to the prompt's over {len(ids)} tokens (mean cosine over MoE "
                          f"layers): {ranked} ({how})"), scores
        pools = {name: [[L.pos[s] for s in ids_] for L, ids_ in zip(self.layers, self.resolve(name)[1])]
                 for name in self.pools}
        best, scores = best_pool(probs, pools)
        ranked = ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items(), key=lambda kv: -kv[1]))
        return best, f"highest router-mass coverage of the prompt over {len(ids)} tokens: {ranked} ({how})", scores

    def router_profile(self, docs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per MoE layer: the mean over `docs` of each document's mean router probability (the chooser's probe)."""
        per_doc = [[p.mean(axis=0) for p in self.router_mass(d)] for d in docs if len(d)]
        if not per_doc:
            raise PoolError("no tokens to profile")
        return [np.mean([d[m] for d in per_doc], axis=0) for m in range(len(self.layers))]

    def router_profiles(self) -> dict[str, list[np.ndarray]] | None:
        """The manifest's `swappable.profiles` (every pool's calibration text as the chooser probes it), checked
        against the bundle's layers; None when the bundle has none for some pool (then coverage decides)."""
        if getattr(self, "_profiles", False) is not False:
            return self._profiles
        raw = self.sw.get("profiles") or {}
        out = None
        if raw and all(name in raw for name in self.pools):
            out = {}
            for name in self.pools:
                prof = raw[name]
                if len(prof) != len(self.layers) or any(len(v) != len(L.ids) for v, L in zip(prof, self.layers)):
                    raise BundleError(f"{self.root / 'manifest.json'}: field 'swappable.profiles.{name}': "
                                      f"{len(prof)} layers / sizes that do not match the bundle's MoE blocks")
                out[name] = [np.asarray(v, np.float64) for v in prof]
        self._profiles = out
        return out


# ---- the choice itself: pure functions of the router probabilities ---------------------------------------
def coverage(probs: Sequence[np.ndarray], positions: Sequence[list[int]]) -> float:
    """Router-mass coverage of a pool: the mean over MoE layers of the mean over tokens of the probability mass
    the pool's experts get. probs: per MoE layer (T, r_union); positions: per MoE layer the pool's union
    positions (their order is the summation order)."""
    return float(np.mean([p[:, pos].sum(axis=1).mean() for p, pos in zip(probs, positions)]))


def top_experts(probs: Sequence[np.ndarray], counts: Sequence[int]) -> list[np.ndarray]:
    """Per MoE layer: the union positions of the counts[m] experts with the most router mass over the prompt's
    tokens, most first (ties: lower position first)."""
    return [np.argsort(-p.sum(axis=0), kind="stable")[:n] for p, n in zip(probs, counts)]


def closest_profile(probs: Sequence[np.ndarray], profiles: dict[str, list[np.ndarray]]) -> tuple[str, dict[str, float]]:
    """The pool whose calibration profile (per MoE layer, the mean router probability of its calibration text)
    is closest to the prompt's (mean cosine over layers; ties: the first), and every pool's similarity. A pool's
    profile says which experts its domain *prefers*; coverage only says how much mass the pool's experts get,
    which favours pools holding experts every domain uses (measured on emo-tiny: nearest profile 32/32 held-out
    documents right, coverage 24/32)."""
    mean = [p.mean(axis=0) for p in probs]

    def cos(a, b):
        n = float(np.linalg.norm(a) * np.linalg.norm(b))
        return float(a @ b) / n if n > 0 else 0.0

    scores = {name: float(np.mean([cos(m, c) for m, c in zip(mean, prof)])) for name, prof in profiles.items()}
    return max(scores, key=lambda k: scores[k]), scores


def best_pool(probs: Sequence[np.ndarray], pools: dict[str, list[list[int]]]) -> tuple[str, dict[str, float]]:
    """The pool (name -> per-layer union positions) with the highest coverage (ties: the first), and every
    pool's coverage."""
    scores = {name: coverage(probs, positions) for name, positions in pools.items()}
    return max(scores, key=lambda k: scores[k]), scores
