"""The transfers of the tiered cache: disk -> RAM slot reads on the I/O thread pool, RAM -> GPU slot
copies on a dedicated CUDA copy stream ordered by CUDA events, the in-flight records, and what
happens when one completes or fails.

Threads: the methods run on the caller's (model's) thread, except `_read` / `_copy*`, which run on
the I/O threads and only fill the slot bytes they were handed and enqueue the copy. Which key gets
which slot is decided by the caller (slots.py); a failed transfer drops its key from the tier(s)
here, as soon as nobody holds it (`purge`), so garbage bytes are never served.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Hashable

import torch

from moe_local.cache.tiers import Tier

Key = Hashable


@dataclass
class Load:
    tier: Tier
    key: Key
    future: Future
    host_pin: bool = False  # the RAM copy is pinned until this GPU copy completes


class Transfers:
    """In-flight slot fills of a RAM tier and an optional device tier (`gpu`)."""

    def __init__(self, source, host: Tier, gpu: Tier | None, device: torch.device, io_threads: int) -> None:
        self.source = source
        self.host = host
        self.gpu = gpu
        self.device = device
        self.cuda = device.type == "cuda"
        # without CUDA a device tier is simulated by a CPU slab and synchronous copies (tests)
        self.copy_stream = torch.cuda.Stream(device) if self.cuda and gpu is not None else None
        self.inflight: dict[tuple[str, Key], Load] = {}
        self.broken: set[tuple[str, Key]] = set()  # slots whose transfer failed: never served
        self.pool = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="moe-local-io")

    # ------------------------------------------------------------------ starting
    def start_read(self, key: Key, nbytes: int) -> None:
        """Disk -> `key`'s (already assigned) RAM slot."""
        fut = self.pool.submit(self._read, key, self.host.buffer(key, nbytes))
        self.inflight[("ram", key)] = Load(self.host, key, fut)

    def start_copy(self, tier: Tier, key: Key, nbytes: int, free_ev) -> None:
        """RAM slot -> `key`'s device slot; the RAM slot exists (and is pinned), maybe still being read."""
        hload = self.inflight.get(("ram", key))
        hbuf, dbuf = self.host.buffer(key, nbytes), tier.buffer(key, nbytes)
        if hload is None:
            fut: Future = Future()
            fut.set_result(self._copy(hbuf, dbuf, free_ev))
        else:
            fut = self.pool.submit(self._copy_after, hload.future, hbuf, dbuf, free_ev)
        self.inflight[(tier.name, key)] = Load(tier, key, fut, host_pin=True)

    def start_read_copy(self, tier: Tier, key: Key, nbytes: int, free_ev) -> None:
        """Disk -> RAM slot -> device slot as one job (both slots already assigned, the RAM one pinned)."""
        hbuf, dbuf = self.host.buffer(key, nbytes), tier.buffer(key, nbytes)
        fut = self.pool.submit(self._read_copy, key, hbuf, dbuf, free_ev)
        self.inflight[("ram", key)] = Load(self.host, key, fut)
        self.inflight[(tier.name, key)] = Load(tier, key, fut, host_pin=True)

    def inflight_keys(self, tier: Tier) -> set:
        """Keys whose slot in `tier` is being written (or, for RAM, read by a GPU copy)."""
        return {k for (name, k), load in self.inflight.items()
                if name == tier.name or (tier is self.host and load.host_pin)}

    def mark_slot_free(self, tier: Tier, slot: int) -> None:
        """GPU: the next copy into this slot must wait for every kernel already queued that reads it."""
        tier.decoded.pop(slot, None)
        if tier is self.gpu and self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            tier.free_events[slot] = ev

    # runs on I/O threads -------------------------------------------------
    def _read(self, key: Key, hbuf: torch.Tensor) -> None:
        self.source.read_into(key[0], key[1], hbuf, verify=True)
        return None

    def _copy(self, hbuf: torch.Tensor, dbuf: torch.Tensor, free_ev) -> Any:
        if not self.cuda:  # simulated device tier (tests): a plain synchronous copy
            dbuf.copy_(hbuf)
            return None
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):  # I/O threads: set both
            if free_ev is not None:
                self.copy_stream.wait_event(free_ev)
            dbuf.copy_(hbuf, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        return ev

    def _copy_after(self, host_future: Future, hbuf, dbuf, free_ev) -> Any:
        host_future.result()
        return self._copy(hbuf, dbuf, free_ev)

    def _read_copy(self, key: Key, hbuf, dbuf, free_ev) -> Any:
        self._read(key, hbuf)
        return self._copy(hbuf, dbuf, free_ev)

    # completion ------------------------------------------------------------
    def arrived(self, tier: Tier, key: Key) -> bool:
        """No transfer into `key`'s slot is pending (a prefetch that arrived in time is an effective hit)."""
        load = self.inflight.get((tier.name, key))
        if load is None:
            return True
        if not load.future.done() or load.future.exception() is not None:
            return False
        ev = load.future.result()
        return ev is None or ev.query()

    def finish(self, tier: Tier, key: Key, swallow: bool = False) -> None:
        """Wait for the transfer into `key`'s slot; on failure drop the key and re-raise (or swallow)."""
        load = self.inflight.get((tier.name, key))
        if load is None:
            return
        try:
            ev = load.future.result()
            if ev is not None:
                ev.synchronize()
        except BaseException:
            self._drop_failed(load)
            if swallow:
                return
            raise
        self._complete(load)

    def _complete(self, load: Load) -> None:
        self.inflight.pop((load.tier.name, load.key), None)
        if load.host_pin:
            self.host.table.unpin(load.key)
            hload = self.inflight.get(("ram", load.key))
            if hload is not None and hload.future is load.future:
                self.inflight.pop(("ram", load.key))
        self.purge(load.tier, load.key)
        self.purge(self.host, load.key)

    def _drop_failed(self, load: Load) -> None:
        """A failed read (checksum, I/O error): the slot holds garbage, so the key leaves the tier(s)
        as soon as nobody holds it (see `purge`); a later demand reads it again and fails loudly."""
        self._complete(load)
        for tier in (load.tier, self.host):
            key = load.key
            if key not in tier.table:
                continue
            self.broken.add((tier.name, key))
            other = self.inflight.get((tier.name, key))
            if other is not None and other.future.done():
                self._complete(other)
            self.purge(tier, key)

    def purge(self, tier: Tier, key: Key) -> None:
        """Free `key`'s slot if its transfer failed and nobody holds it any more."""
        if (tier.name, key) not in self.broken or key not in tier.table:
            return
        if tier.table.pins[key] > 0 or (tier.name, key) in self.inflight:
            return
        self.broken.discard((tier.name, key))
        transient = key in tier.table.transient
        slot = tier.table.release(key)
        if not transient:
            tier.policy.on_remove(key)
        self.mark_slot_free(tier, slot)

    def reap(self) -> None:
        """Settle every transfer that is done, without waiting for any."""
        for load in list(self.inflight.values()):
            if (load.tier.name, load.key) not in self.inflight or not load.future.done():
                continue
            if load.future.exception() is not None:
                if load.tier.table.pins[load.key] == 0:
                    self._drop_failed(load)
                continue
            ev = load.future.result()
            if ev is None or ev.query():
                self._complete(load)

    def wait_one(self, tier: Tier) -> bool:
        """Block until the oldest transfer that holds a slot of `tier` completes (it may free one):
        a transfer into the tier, or (RAM tier) a GPU copy still reading its RAM slot. False if none."""
        for (name, key), load in list(self.inflight.items()):
            if name == tier.name or (tier is self.host and load.host_pin):
                self.finish(load.tier, key, swallow=True)
                return True
        return False

    def drain(self) -> None:
        """Wait for every transfer still in flight (prefetches of the last token) and settle it."""
        for name, key in list(self.inflight):
            self.finish(self.gpu if name == "gpu" else self.host, key, swallow=True)

    def close(self) -> None:
        self.drain()
        self.pool.shutdown(wait=True)
