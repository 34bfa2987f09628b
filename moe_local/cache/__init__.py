"""The expert cache: tiers of slots, eviction policies, transfers, prefetch bookkeeping, counters (numbers
only), routing traces and the trace simulator. Sees experts as keys and byte ranges; never imports models."""

from moe_local.cache.policies import POLICIES, EvictionPolicy, make_policy

__all__ = ["POLICIES", "EvictionPolicy", "make_policy"]
