"""The expert cache: eviction policies, routing traces, the trace simulator and run reports."""

from moe_local.cache.policies import POLICIES, EvictionPolicy, make_policy

__all__ = ["POLICIES", "EvictionPolicy", "make_policy"]
