"""Look-ahead prefetch bookkeeping of the tiered cache: which predicted experts were issued, and
whether the layer they were predicted for used them (the prefetch counters of stats.py); plus the
check that a `--policy belady` future matches the run.

Why apart from tiered.py: this is pure bookkeeping over keys. The slots and transfers it needs are
handed in as two functions (`acquire`, `start`), so it never touches a slab, a thread or a stream.
"""

from __future__ import annotations

import sys
from typing import Callable, Hashable, Sequence

import torch

from moe_local.cache.stats import CacheStats
from moe_local.cache.tiers import Tier
from moe_local.experts import ExpertPredictor

Key = Hashable


class FutureCheck:
    """Compares the run's demanded experts with the future `--policy belady` evicts by; warns once.

    Why: belady only decides eviction, so a trace of another prompt (or a run longer than the
    recording) still gives correct tokens -- but with a wrong future, silently. Like llama.cpp on a
    mismatched but usable input, we say so once on stderr and carry on. The demand order is the one
    `future_from_trace` produces: per layer call, the sorted distinct experts of the pass.
    """

    def __init__(self, future: Sequence[Key], label: str | None = None) -> None:
        self.future = list(future)
        self.label = label or "the belady future"
        self.pos = 0
        self.warned = False

    def demand(self, keys: Sequence[Key]) -> None:
        if self.warned:
            return
        start, self.pos = self.pos, self.pos + len(keys)
        expected = self.future[start:self.pos]
        if list(keys) == expected:
            return
        self.warned = True
        if len(expected) < len(keys):
            what = f"the run went past the {len(self.future):,} expert uses it recorded"
        else:
            what = f"at expert use {start:,} the run demanded {list(keys)}, the trace has {expected}"
        sys.stderr.write(f"warning: {self.label} does not match this run ({what}); belady now evicts by a wrong "
                         "future: tokens are unaffected, hit rates are not the optimum\n")


class PrefetchBook:
    """Prefetches in flight or waiting for their layer, and the depth-1 predictions to score."""

    def __init__(self, stats: CacheStats) -> None:
        self.stats = stats
        self.pending: dict[tuple[str, Key], int] = {}  # (tier, key) -> layer it was predicted for
        self.predictions: dict[int, set[int]] = {}  # layer -> depth-1 predicted ids, scored on arrival

    def settle(self, layer: int, need: set) -> tuple[bool, set]:
        """`layer` runs now and demands `need`: score its prediction and settle its prefetches.
        Returns (a prediction was made for this call, the demanded experts a prefetch brought)."""
        st = self.stats
        pred = self.predictions.pop(layer, None)
        predicted = pred is not None or any(t == layer for t in self.pending.values())
        if pred is not None:
            st.actual_scored += len(need)
            st.predicted_right += sum(1 for (_, e) in need if e in pred)
        prefetched = set()
        for tk, target in list(self.pending.items()):
            if target != layer:
                continue
            del self.pending[tk]
            if tk[1] in need:
                st.prefetch_used += 1
                prefetched.add(tk[1])
            else:
                st.prefetch_wasted += 1
        return predicted, prefetched

    def evicted(self, tier: str, key: Key) -> None:
        """A slot left `tier` before its layer came: a prefetch there was wasted."""
        if self.pending.pop((tier, key), None) is not None:
            self.stats.prefetch_wasted += 1

    def issue(self, predictor: ExpertPredictor, layer: int, x: torch.Tensor, need: set, site: str,
              skip_wide: bool, compute: Tier, host: Tier, gpu: Tier | None,
              acquire: Callable[..., int | None], start: Callable[..., bool], trace=None) -> None:
        """Prefetch predicted experts of later layers into free or evictable slots, never evicting
        anything this layer needs or anything already prefetched for a layer still to come.

        Depth 1 goes to the compute tier, deeper predictions to RAM. skip_wide: skip a target whose
        prediction does not fit its tier (a wide prefill chunk will stream that layer anyway;
        prefetching it would only flush the cache). MoE layers get the same effect by not
        prefetching while they stream themselves."""
        for depth, target, ranked in predictor.predict(layer, x, site):
            if trace is not None:
                trace.predicted_ids(depth, target, ranked)
            if depth == 1:
                self.predictions[target] = set(ranked)
            tier = compute if depth == 1 else host
            if skip_wide and len(ranked) > tier.capacity:
                continue
            protect = set(need) | {k for (name, k) in self.pending if name == tier.name}
            for e in ranked:
                k = (target, e)
                if k in tier.table or (tier is host and gpu is not None and k in gpu.table):
                    protect.add(k)  # famB2: a predicted expert already here must not make room for the next one
                    continue
                if acquire(tier, k, hard=protect, block=False) is None:
                    break
                if not start(tier, k, demand=False, block=False):
                    tier.table.release(k)
                    tier.policy.on_remove(k)
                    break
                self.stats.prefetch_issued += 1
                self.pending[(tier.name, k)] = target
                protect.add(k)
