"""Eviction policies for the expert cache: which resident expert to drop when a slot is needed.

A key is `(layer, expert)`. One policy instance manages the keys of *every* layer: the budget is
global, so a layer whose routing is concentrated on a few experts automatically gets fewer slots
than a layer that spreads out.

The cache (moe_local/cache/tiered.py, and the trace replay in simulate.py) drives a policy through
four calls, and the policy never decides residency itself -- it only ranks:

    on_access(key, hit)   every demanded use, hit or miss (before the insert on a miss)
    on_insert(key)        key became resident (a prefetch insert calls only this, not on_access)
    on_remove(key)        key left the tier
    victim(resident, pinned) -> key | None
                          the resident, non-pinned key to evict; None when every resident key is
                          pinned. Pure: it changes no state, the cache calls on_remove afterwards.

The policy's own view of which keys are resident (built from on_insert/on_remove) is authoritative;
`resident` is accepted for the protocol and only consulted for keys the policy never saw inserted.
Pinned keys (the experts of the layer being computed, experts being prefetched for the next one)
are skipped, never evicted.

Policies
--------
- ``lru``        least recently used: the baseline every offloading runtime ships.
- ``lfu-aging``  least frequently used with periodic halving of all counts (ties -> least recent).
                 Counts are kept for non-resident keys too (there are only layers x experts keys),
                 so a popular expert that was evicted once comes back with its history.
- ``arc``        Adaptive Replacement Cache (Megiddo & Modha 2003): a recency list and a frequency
                 list whose split adapts to ghost hits. Prefetched-but-unused keys stay in the recency
                 list, so a prefetch followed by its one use does not look like "frequent".
- ``belady``     the offline optimum (MIN): evict the key whose next use is furthest in the future.
                 Needs the future demand sequence (a recorded trace), so it is for the simulator.

Which policy to use
-------------------
Measured by replaying the shared trained model's routing through `moe-local simulate` (the table
and the commands that reproduce it are in README's "Tiered expert cache" section):
- Without prefetch, `lfu-aging` is the best online policy: expert popularity is skewed and fairly
  stable, so frequency is the signal; halving every 8 x capacity accesses lets it follow drift.
- One global LRU is *worse* than per-layer LRUs: layers run in a fixed cycle, so the least recent
  keys are always those of the layer about to run. Frequency-based ranking has no such phase
  problem, and the global Belady optimum is above the per-layer one, which is why the budget is
  global.
- With router-lookahead prefetch (the intended way to run), `arc` is best at a quarter of the
  experts and more: prefetched experts enter its recency list and do not displace the frequency
  list. `moe-local simulate --budget` picks per trace and size. Hit rates with prefetch assume every
  prefetch arrives in time.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, defaultdict
from typing import Callable, Hashable, Iterable, Protocol, Sequence

from moe_local.errors import MoeLocalError

Key = Hashable  # in practice tuple[int, int] = (layer, expert)

POLICIES: tuple[str, ...] = ("lru", "lfu-aging", "arc", "belady")


class EvictionPolicy(Protocol):
    name: str

    def on_access(self, key: Key, hit: bool) -> None: ...

    def on_insert(self, key: Key) -> None: ...

    def on_remove(self, key: Key) -> None: ...

    def victim(self, resident: Iterable[Key], pinned: set) -> Key | None: ...


def _first_unpinned(keys: Iterable[Key], pinned: set) -> Key | None:
    for key in keys:
        if key not in pinned:
            return key
    return None


def _fallback(resident: Iterable[Key], known: object, pinned: set) -> Key | None:
    """A resident key the policy never saw inserted (cache/policy out of step): evict it first."""
    for key in resident:
        if key not in known and key not in pinned:  # type: ignore[operator]
            return key
    return None


class _LazyHeap:
    """The resident keys ranked by `rank(key)` (lowest evicted first) in a lazy-deletion min-heap.

    Why lazy: a key's rank changes on every access, and re-sorting is O(n). Each change pushes a
    fresh entry `(*rank, seq, key)` instead; an entry whose rank no longer equals the key's current
    one (or whose key left) is stale and dropped when it surfaces. `seq` keeps the heap from ever
    comparing keys and breaks ties by age. Shared by LFU-with-aging and Belady.
    """

    def __init__(self, rank: Callable[[Key], tuple]) -> None:
        self.rank = rank
        self.resident: set[Key] = set()  # the policy's own view of residency (authoritative)
        self.entries: list[tuple] = []
        self._seq = itertools.count()

    def push(self, key: Key) -> None:
        heapq.heappush(self.entries, (*self.rank(key), next(self._seq), key))

    def rebuild(self) -> None:
        """Re-rank every resident key (after a change of every rank, or to shed stale entries)."""
        self.entries = [(*self.rank(k), next(self._seq), k) for k in self.resident]
        heapq.heapify(self.entries)

    def add(self, key: Key) -> None:
        self.resident.add(key)
        self.push(key)

    def discard(self, key: Key) -> None:
        self.resident.discard(key)
        if len(self.entries) > 4 * len(self.resident) + 64:
            self.rebuild()

    def victim(self, resident: Iterable[Key], pinned: set) -> Key | None:
        skipped = []
        found = None
        heap = self.entries
        while heap:
            entry = heap[0]
            key = entry[-1]
            if key not in self.resident or entry[:-2] != self.rank(key):
                heapq.heappop(heap)  # stale entry
                continue
            if key in pinned:
                skipped.append(heapq.heappop(heap))
                continue
            found = key
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        if found is None and not self.resident:
            found = _fallback(resident, self.resident, pinned)
        return found


class _HeapRankedPolicy:
    """A policy whose residency and eviction order live in a `_LazyHeap` (`self._heap`); subclasses
    only say how a key ranks and when a rank changes (`on_access`)."""

    _heap: _LazyHeap

    def on_insert(self, key: Key) -> None:
        self._heap.add(key)

    def on_remove(self, key: Key) -> None:
        self._heap.discard(key)

    def victim(self, resident: Iterable[Key], pinned: set) -> Key | None:
        return self._heap.victim(resident, pinned)


class LRUPolicy:
    """Least recently used. Inserts (demand or prefetch) count as the most recent use."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def on_access(self, key: Key, hit: bool) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, resident: Iterable[Key], pinned: set) -> Key | None:
        key = _first_unpinned(self._order, pinned)
        if key is None and not self._order:
            key = _fallback(resident, self._order, pinned)
        return key


class LFUAgingPolicy(_HeapRankedPolicy):
    """LFU whose counts are halved every `period` accesses, so yesterday's favourites fade.

    Why aging: routing drifts with the content (a docstring vs. a loop body pick different experts);
    pure LFU would keep experts that were hot long ago forever. Ties break towards the least recent.
    The ranking lives in a lazy heap: every access pushes a fresh entry, stale ones are skipped.
    """

    name = "lfu-aging"

    def __init__(self, capacity: int, period: int | None = None) -> None:
        self.capacity = capacity
        self.period = max(1, period if period is not None else 8 * max(1, capacity))
        self._count: dict[Key, int] = defaultdict(int)
        self._last: dict[Key, int] = {}
        self._clock = 0
        self._heap = _LazyHeap(lambda k: (self._count[k], self._last.get(k, -1)))
        self._resident = self._heap.resident

    def on_access(self, key: Key, hit: bool) -> None:
        self._clock += 1
        self._count[key] += 1
        self._last[key] = self._clock
        if self._clock % self.period == 0:
            for k in list(self._count):
                self._count[k] //= 2
                if self._count[k] == 0 and k not in self._resident:
                    del self._count[k]
            self._heap.rebuild()
        elif key in self._resident:
            self._heap.push(key)


class ARCPolicy:
    """Adaptive Replacement Cache: T1 (seen once) + T2 (seen again), ghosts B1/B2 steer the split p."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.p = 0.0  # target size of T1
        self.t1: OrderedDict[Key, None] = OrderedDict()
        self.t2: OrderedDict[Key, None] = OrderedDict()
        self.b1: OrderedDict[Key, None] = OrderedDict()
        self.b2: OrderedDict[Key, None] = OrderedDict()
        self._pending_t2: set[Key] = set()  # missed keys whose ghost hit says "frequent"
        self._unused_prefetch: set[Key] = set()
        self._last_miss_in_b2 = False
        # keys that missed and await their insert: the cache may report all misses of a layer before
        # inserting any, so this is a set (an insert of a key not in it is a prefetch)
        self._missed: set[Key] = set()

    def on_access(self, key: Key, hit: bool) -> None:
        if key in self.t1:
            if key in self._unused_prefetch:  # first real use of a prefetched key: still "seen once"
                self._unused_prefetch.discard(key)
                self.t1.move_to_end(key)
            else:
                del self.t1[key]
                self.t2[key] = None
            return
        if key in self.t2:
            self.t2.move_to_end(key)
            return
        # a miss: adapt p on a ghost hit
        self._missed.add(key)
        self._last_miss_in_b2 = False
        if key in self.b1:
            self.p = min(float(self.capacity), self.p + max(len(self.b2) / len(self.b1), 1.0))
            del self.b1[key]
            self._pending_t2.add(key)
        elif key in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1.0))
            del self.b2[key]
            self._pending_t2.add(key)
            self._last_miss_in_b2 = True

    def on_insert(self, key: Key) -> None:
        self.b1.pop(key, None)
        self.b2.pop(key, None)
        if key in self._pending_t2:
            self._pending_t2.discard(key)
            self.t2[key] = None
            self.t2.move_to_end(key)
        elif key not in self.t1 and key not in self.t2:
            self.t1[key] = None
            if key not in self._missed:
                self._unused_prefetch.add(key)  # an insert without a demand: a prefetch
        self._missed.discard(key)
        self._trim_ghosts()

    def on_remove(self, key: Key) -> None:
        self._unused_prefetch.discard(key)
        if key in self.t1:
            del self.t1[key]
            self.b1[key] = None
        elif key in self.t2:
            del self.t2[key]
            self.b2[key] = None
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        c = self.capacity
        while self.b1 and len(self.t1) + len(self.b1) > c:
            self.b1.popitem(last=False)
        while self.b2 and len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * c:
            self.b2.popitem(last=False)

    def victim(self, resident: Iterable[Key], pinned: set) -> Key | None:
        t1_first = bool(self.t1) and (
            len(self.t1) > self.p or (self._last_miss_in_b2 and len(self.t1) >= self.p)
        )
        lists = (self.t1, self.t2) if t1_first else (self.t2, self.t1)
        for lst in lists:
            key = _first_unpinned(lst, pinned)
            if key is not None:
                return key
        if not self.t1 and not self.t2:
            return _fallback(resident, (), pinned)
        return None


class BeladyPolicy(_HeapRankedPolicy):
    """Offline optimum: evict the resident key whose next demanded use is furthest away.

    `future` is the full demand sequence the cache will see. Each on_access consumes that key's next
    occurrence, so the order of accesses *within* a layer may differ from the recording without
    harm. A key with no further use has distance infinity and goes first.
    """

    name = "belady"

    def __init__(self, capacity: int, future: Sequence[Key]) -> None:
        self.capacity = capacity
        self._positions: dict[Key, list[int]] = defaultdict(list)
        for i, key in enumerate(future):
            self._positions[key].append(i)
        self._ptr: dict[Key, int] = defaultdict(int)
        self._heap = _LazyHeap(lambda k: (-self._next_use(k),))  # furthest next use surfaces first
    def _next_use(self, key: Key) -> float:
        """Position of the key's next unconsumed use; changes only when the key is accessed."""
        pos = self._positions.get(key)
        i = self._ptr.get(key, 0)
        return float(pos[i]) if pos and i < len(pos) else float("inf")

    def on_access(self, key: Key, hit: bool) -> None:
        self._ptr[key] += 1
        if key in self._heap.resident:
            self._heap.push(key)


def make_policy(name: str, capacity: int, future: Sequence[Key] | None = None) -> EvictionPolicy:
    """Build a policy by its CLI name. `future` (the demand sequence) is required for belady only."""
    name = name.strip().lower()
    if capacity < 1:
        raise MoeLocalError(f"cache capacity must be at least 1 slot, got {capacity}")
    if name == "lru":
        return LRUPolicy(capacity)
    if name in ("lfu-aging", "lfu"):
        return LFUAgingPolicy(capacity)
    if name == "arc":
        return ARCPolicy(capacity)
    if name == "belady":
        if future is None:
            raise MoeLocalError(
                "policy 'belady' needs the future access sequence: use it in `moe-local simulate` on a recorded trace"
            )
        return BeladyPolicy(capacity, future)
    raise MoeLocalError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
