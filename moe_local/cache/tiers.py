"""Fixed slabs of expert slots and the bookkeeping of which expert occupies which slot.

Why fixed slabs: every expert of a pack fits in one slot (slot = largest packed expert, rounded to
a page), so one allocation made at start-up serves the whole run. Nothing is allocated or freed per
token: no allocator fragmentation, no surprise out-of-memory, and the GPU budget is a hard limit.

`SlotTable` is pure bookkeeping, touched only by the thread that runs the model; I/O threads only
ever write the bytes of a slot they were handed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Iterator, Mapping

import torch

Key = Hashable  # (layer, expert)


class SlotTable:
    """key <-> slot, free slots, pin counts and transient (not cached) occupants."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * self.capacity
        self._free: list[int] = list(range(self.capacity - 1, -1, -1))  # pop() gives the lowest slot
        self.pins: Counter = Counter()
        self.transient: set[Key] = set()  # occupies a slot for one use, never known to the policy

    def __contains__(self, key: Key) -> bool:
        return key in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def keys(self) -> Iterator[Key]:
        return iter(list(self.slot_of))

    def cached_keys(self) -> list[Key]:
        return [k for k in self.slot_of if k not in self.transient]

    @property
    def has_free(self) -> bool:
        return bool(self._free)

    def assign(self, key: Key, transient: bool = False) -> int:
        assert key not in self.slot_of, f"{key} already has a slot"
        slot = self._free.pop()
        self.slot_of[key] = slot
        self.key_of[slot] = key
        if transient:
            self.transient.add(key)
        return slot

    def release(self, key: Key) -> int:
        assert self.pins[key] == 0, f"releasing pinned {key}"
        slot = self.slot_of.pop(key)
        self.key_of[slot] = None
        self.transient.discard(key)
        self._free.append(slot)
        self._free.sort(reverse=True)
        return slot

    def pin(self, key: Key) -> None:
        self.pins[key] += 1

    def unpin(self, key: Key) -> None:
        self.pins[key] -= 1
        if self.pins[key] <= 0:
            del self.pins[key]

    def pinned(self) -> set:
        return set(self.pins) | self.transient


def pinned_piece_sizes(slots: int, slot_bytes: int) -> list[tuple[int, int]]:
    """(bytes, slots) of the pieces a pinned slab is allocated in: every piece a power of two bytes.

    Why: torch's pinned host allocator rounds each block up to the next power of two, so one 24.7 GB
    slab would pin 32 GiB -- far past `--ram`. A piece of exactly 2^k bytes is not rounded; taking
    the largest 2^k that the remaining slots fill at least one slot of leaves less than one slot of
    each piece unused, and the pieces halve the remainder each time (a few dozen at most)."""
    pieces: list[tuple[int, int]] = []
    left = slots
    while left > 0:
        want = left * slot_bytes
        size = 1 << (want.bit_length() - 1)  # the largest power of two <= want
        if size < slot_bytes:  # fewer than one slot fits: the smallest power of two that holds one
            size = 1 << (slot_bytes - 1).bit_length()
        n = min(left, size // slot_bytes)
        pieces.append((size, n))
        left -= n
    return pieces


class PieceSlab:
    """Slots spread over several tensors, addressed like one [slots, slot_bytes] tensor (`slab[i, :n]`)."""

    def __init__(self, pieces: list[torch.Tensor], slot_bytes: int) -> None:
        self.pieces = pieces  # each [n_i, slot_bytes]
        self._where = [(p, row) for p in pieces for row in range(p.shape[0])]
        self.shape = (len(self._where), slot_bytes)

    def __getitem__(self, index):
        slot, cols = index
        piece, row = self._where[slot]
        return piece[row, cols]


def allocate_slab(slots: int, slot_bytes: int, device: torch.device, pin: bool = False, pieces: bool | None = None):
    """One uint8 slab [slots, slot_bytes]. Rows start on a 4096-byte boundary (slot_bytes is a page
    multiple), so views of any dtype into a slot are aligned. Host slabs are pinned when a GPU will
    read them (only pinned memory copies asynchronously at full PCIe speed), and then allocated in
    power-of-two pieces (`pinned_piece_sizes`) so the pinned allocator does not round the slab up.
    `pieces` forces (or forbids) the piecewise layout on any host slab (tests)."""
    if slots == 0:
        return torch.empty((0, slot_bytes), dtype=torch.uint8, device=device)
    if device.type == "cpu":
        if pieces if pieces is not None else pin:
            parts = [torch.empty(size, dtype=torch.uint8, pin_memory=pin)[: n * slot_bytes].view(n, slot_bytes)
                     for size, n in pinned_piece_sizes(slots, slot_bytes)]
            return PieceSlab(parts, slot_bytes)
        return torch.empty((slots, slot_bytes), dtype=torch.uint8, pin_memory=pin)
    return torch.empty((slots, slot_bytes), dtype=torch.uint8, device=device)


@dataclass(frozen=True)
class TierState:
    """A tier at one moment, as keys and counts (for `/stats` and tests): a copy, never the tier itself."""

    name: str
    capacity: int
    cached: frozenset  # keys the eviction policy manages
    pins: Mapping[Key, int]  # keys held (by a layer call in progress, or a GPU copy reading a RAM slot)
    transient: frozenset  # keys streaming through a slot for one use, never cached

    @property
    def used(self) -> int:
        return len(self.cached) + len(self.transient)


class Tier:
    """A slab plus its table and its eviction policy: the RAM tier or the GPU tier."""

    def __init__(self, name: str, slab: "torch.Tensor | PieceSlab", policy) -> None:
        self.name = name
        self.slab = slab
        self.table = SlotTable(slab.shape[0])
        self.policy = policy
        self.decoded: dict[int, tuple[Key, object]] = {}  # slot -> (key, compute-ready weights)
        self.free_events: dict[int, object] = {}  # slot -> CUDA event: compute that read it is done

    @property
    def capacity(self) -> int:
        return self.table.capacity

    def state(self) -> TierState:
        t = self.table
        return TierState(self.name, self.capacity, frozenset(t.cached_keys()), dict(t.pins), frozenset(t.transient))

    def buffer(self, key: Key, nbytes: int) -> torch.Tensor:
        return self.slab[self.table.slot_of[key], :nbytes]
