"""Which expert gets which slot of the tiered cache: acquisition (a free slot or the policy's victim),
eviction, staging a device-tier fill through the RAM tier, and the compute-ready weights of a slot.

Why apart from tiered.py: this is the tier-level half of the cache (one key, one tier at a time);
tiered.py keeps the layer-call half (which keys a call holds, in which order it waits for them).
Bookkeeping only on the caller's thread; the bytes move through `Transfers`.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch

from moe_local.cache.stats import CacheStats
from moe_local.cache.tiers import Tier
from moe_local.cache.transfers import Transfers
from moe_local.errors import MoeLocalError

Key = Hashable


class Slots:
    """The RAM tier and an optional device tier (`gpu`) over one expert source."""

    def __init__(self, source, host: Tier, gpu: Tier | None, transfers: Transfers, stats: CacheStats,
                 on_evict: Callable[[str, Key], None], device: torch.device, dtype: torch.dtype | None) -> None:
        self.source = source
        self.host = host
        self.gpu = gpu
        self.transfers = transfers
        self.stats = stats
        self.on_evict = on_evict  # (tier name, key): a prefetch there may have been wasted
        self.device = device
        self.dtype = dtype

    def acquire(self, tier: Tier, key: Key, hard: set = frozenset(), soft: set = frozenset(),
                transient: bool = False, block: bool = True) -> int | None:
        """A slot for `key`: a free one, or the policy's victim among keys nobody needs now (`hard`
        never, `soft` only when nothing else can go). Blocking waits for transfers to free one."""
        while not tier.table.has_free:
            pinned = tier.table.pinned() | self.transfers.inflight_keys(tier) | set(hard)
            victim = tier.policy.victim(tier.table.cached_keys(), pinned | set(soft))
            if victim is None and soft:
                victim = tier.policy.victim(tier.table.cached_keys(), pinned)
            if victim is not None:
                self.evict(tier, victim)
                break
            if not block or not self.transfers.wait_one(tier):
                if block:
                    raise MoeLocalError(f"the {tier.name} expert cache has no slot that can be freed (all pinned)")
                return None
        slot = tier.table.assign(key, transient=transient)
        tier.decoded.pop(slot, None)
        if not transient:
            tier.policy.on_insert(key)
        return slot

    def evict(self, tier: Tier, key: Key) -> None:
        slot = tier.table.release(key)
        tier.policy.on_remove(key)
        tier.decoded.pop(slot, None)
        self.stats.tiers[tier.name].evictions += 1
        self.transfers.mark_slot_free(tier, slot)
        self.on_evict(tier.name, key)

    def fill(self, tier: Tier, key: Key, demand: bool, block: bool) -> bool:
        """Start filling `key`'s (already assigned) slot in `tier`; a device slot is fed from the RAM
        tier (its copy pinned there until the GPU copy completes). False if no RAM slot was available."""
        n = self.source.expert_nbytes(*key)
        host, st = self.host, self.stats
        if tier is host:
            self.transfers.start_read(key, n)
            st.disk_to_ram += n
            return True
        slot = tier.table.slot_of[key]
        free_ev = tier.free_events.pop(slot, None)
        if key in host.table:
            if demand:
                host.policy.on_access(key, True)
                st.tiers["ram"].hits += 1
            host.table.pin(key)
            self.transfers.start_copy(tier, key, n, free_ev)
        else:
            if demand:
                host.policy.on_access(key, False)
                st.tiers["ram"].misses += 1
            if self.acquire(host, key, block=block) is None:
                if free_ev is not None:
                    tier.free_events[slot] = free_ev
                return False
            host.table.pin(key)
            self.transfers.start_read_copy(tier, key, n, free_ev)
            st.disk_to_ram += n
        st.ram_to_gpu += n
        return True

    def ensure_host(self, key: Key, block: bool, demand: bool) -> bool:
        """`--miss cpu`: make sure the expert's RAM copy exists (or is on its way). False if no slot."""
        host = self.host
        if key in host.table:
            if demand:
                host.policy.on_access(key, True)
                self.stats.tiers["ram"].hits += 1
            return True
        if demand:
            host.policy.on_access(key, False)
            self.stats.tiers["ram"].misses += 1
        if self.acquire(host, key, block=block) is None:
            return False
        self.fill(host, key, demand=demand, block=block)
        return True

    def weights(self, tier: Tier, key: Key, device: torch.device, dtype: torch.dtype | None):
        """The expert in `key`'s slot, ready for compute on `device` (kept per slot when a pure view)."""
        slot = tier.table.slot_of[key]
        cached = tier.decoded.get(slot) if device == self.device else None
        if cached is not None and cached[0] == key:
            return cached[1]
        raw = self.source.decode(tier.buffer(key, self.source.expert_nbytes(*key)), *key)
        w = raw.to(device, dtype)
        if device == self.device and all(_same_memory(a, b) for a, b in
                                         zip((raw.gate, raw.up, raw.down), (w.gate, w.up, w.down))):
            tier.decoded[slot] = (key, w)  # a pure view of the slot: safe to keep while the slot is
        return w


def _same_memory(a, b) -> bool:
    """True when `b` (after .to(device, dtype)) still views `a`'s bytes: no copy was made."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.data_ptr() == b.data_ptr()
    pa, pb = getattr(a, "packed", None), getattr(b, "packed", None)
    if pa is None or pb is None or pa.keys() != pb.keys():
        return a is b
    return all(pa[k].data_ptr() == pb[k].data_ptr() for k in pa)
