"""TieredExperts: the ExpertProvider that pages routed experts SSD -> RAM slots -> GPU slots.

Data flow of one MoE layer call (`forward(layer, x, ids, weights)`):

1. the layer's distinct experts (ascending ids) are looked up in the compute tier (the GPU slab,
   or the RAM slab without a GPU); the eviction policy hears every use (`on_access`);
2. resident experts are pinned (never evicted while the layer runs); every missing one gets a slot
   (the policy names a non-pinned victim) and its transfer is issued at once: disk -> RAM on the
   I/O thread pool, RAM -> GPU on a dedicated CUDA copy stream, ordered by CUDA events;
3. the model's router look-ahead (`experts.ExpertPredictor`) predicts the next layers' experts and
   they are prefetched into whatever slots are free or evictable *without* touching anything this
   layer needs (the first MoE layer is predicted earlier: the model hands over the hidden state of
   the dense layers before it and of its attention input, see `before_block`);
4. `combine_experts` visits the experts in ascending id order and waits for each one only when its
   turn comes, so compute on the ready experts overlaps the transfers of the others, and the
   arithmetic is the same as `ResidentExperts`' whatever is cached.

Prefill chunks whose layer demands more experts than the compute tier holds are *streamed*: the
missing experts pass through transient slots that are freed right after their use and are never
inserted into the cache, so a long prompt evicts at most a window of slots instead of flushing the
whole cache (it does not thrash).

With `miss="cpu"` (or `auto` when the start-up calibration says the CPU is quicker than the link), a
batch-1 decode miss is computed on the CPU from the expert's RAM copy instead of moving its bytes.

The parts, each its own module: `slots.py` (which key gets which slot of a tier: acquisition,
eviction, staging a GPU fill through RAM), `transfers.py` (the I/O threads, the copy stream, CUDA
events, in-flight records, completion and failure), `prefetch.py` (prefetch issue and settle
bookkeeping, the belady future check), `cpu_compute.py` (the grouped C kernel, `--miss cpu`, the
`--miss auto` calibration) and `stats.py` (counters). This module keeps the layer call: which keys
it holds, in which order it waits for them, and what each use counts as.

Threads: all bookkeeping (tables, policies, counters) happens on the caller's thread; I/O threads
only fill the slot bytes they were handed and enqueue the copy. CUDA code paths are written for a
GPU machine and are not exercised by CPU-only CI (tests marked `gpu`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

from moe_local.cache.budget import BudgetPlan, round_slot
from moe_local.cache.cpu_compute import CpuExpert, GroupedCpu, calibrate_miss
from moe_local.cache.policies import make_policy
from moe_local.cache.prefetch import FutureCheck, PrefetchBook
from moe_local.cache.slots import Slots
from moe_local.cache.stats import CacheStats, TierCounters
from moe_local.cache.tiers import Tier, TierState, allocate_slab
from moe_local.cache.transfers import Transfers
from moe_local.cache.trace import TraceRecorder
from moe_local.errors import MoeLocalError
from moe_local.experts import ExpertPredictor, activation, combine_experts

Key = Hashable
MISS_MODES = ("transfer", "cpu", "auto")


@dataclass
class _Run:
    """State of one layer call."""

    layer: int
    stream: bool
    cpu_miss: bool
    pending: deque = field(default_factory=deque)
    held: list = field(default_factory=list)  # (tier, key) pins this call took
    cpu_keys: set = field(default_factory=set)
    prefetched: set = field(default_factory=set)
    later: set = field(default_factory=set)  # stream mode: resident keys still to be used
    predicted: bool = False  # a prediction was made for this layer call (recall counts its misses)
    prev: Key | None = None
    issued: set = field(default_factory=set)  # demand transfers started by this call (always misses)


class TieredExperts:
    """ExpertProvider over an ExpertBytesSource with a RAM tier, an optional GPU tier and prefetch."""

    def __init__(
        self,
        source,
        *,
        top_k: int,
        host_slots: int,
        gpu_slots: int = 0,
        act: str = "silu",
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        policy: str = "lru",
        future: Sequence[Key] | None = None,
        future_label: str | None = None,
        predictor: ExpertPredictor | None = None,
        miss: str = "transfer",
        io_threads: int = 4,
        trace: TraceRecorder | None = None,
        plan: BudgetPlan | None = None,
        record_accesses: bool = False,
        two_tier: bool | None = None,
    ) -> None:
        """two_tier: give the compute device its own slot tier fed from the RAM tier (default: on
        CUDA). `two_tier=True` on a CPU device simulates the GPU tier with a second CPU slab and
        synchronous copies -- the bookkeeping of the GPU path (slots, pins, RAM staging, `--miss
        cpu`) then runs and is tested on a CPU-only machine; only the CUDA calls are skipped."""
        if miss not in MISS_MODES:
            raise MoeLocalError(f"--miss {miss!r} is not one of {', '.join(MISS_MODES)}")
        self.source = source
        self.device = torch.device(device)
        self.dtype = dtype
        self.act = activation(act)
        self.top_k = int(top_k)
        self.cuda = self.device.type == "cuda"
        self.two_tier = self.cuda if two_tier is None else bool(two_tier)
        self.slot_bytes = round_slot(source.max_expert_nbytes())
        self.moe_layers = list(source.moe_layers)
        self.first_layer = self.moe_layers[0]
        self.policy_name = policy
        self.plan = plan
        self.miss = miss
        self.stats = CacheStats()
        keys = len(self.moe_layers) * int(source.num_experts)
        compute_slots = gpu_slots if self.two_tier else host_slots
        # A compute tier that holds every expert of the pack never evicts: each expert misses at most
        # once in the whole run, and a prefetch could only hide that one first read. The look-ahead
        # costs every token (the next layer's router on each MoE input, its ids to the host, the
        # bookkeeping): ~3% of a CPU decode token here. So with such a budget it does not run at all.
        self.stats.lookahead = predictor is not None and compute_slots < keys
        self.predictor = predictor if self.stats.lookahead else None
        self.trace = trace
        self.access_log: list[Key] | None = [] if record_accesses else None
        # future_label: what to call the future in the mismatch warning (e.g. "--belady-trace FILE")
        self.future_check = FutureCheck(future, future_label) if policy == "belady" and future is not None else None
        cpu = torch.device("cpu")
        self.host = Tier("ram", allocate_slab(host_slots, self.slot_bytes, cpu, pin=self.cuda),
                         make_policy(policy, max(1, host_slots), future))
        self.gpu: Tier | None = None
        if self.two_tier:
            self.gpu = Tier("gpu", allocate_slab(gpu_slots, self.slot_bytes, self.device),
                            make_policy(policy, max(1, gpu_slots), future))
            self.stats.tiers["gpu"] = TierCounters(capacity=gpu_slots)
        self.stats.tiers["ram"] = TierCounters(capacity=host_slots)
        self.compute: Tier = self.gpu if self.gpu is not None else self.host
        if self.compute.capacity < self.top_k:
            raise MoeLocalError(f"the expert cache holds {self.compute.capacity} experts, fewer than top-k = {self.top_k}")
        self.prefetches = PrefetchBook(self.stats)
        self.transfers = Transfers(source, self.host, self.gpu, self.device, io_threads)
        self.slots = Slots(source, self.host, self.gpu, self.transfers, self.stats, self.prefetches.evicted,
                           self.device, dtype)
        # transient slots one streamed (wider-than-the-cache) layer may hold at once
        self.stream_window = max(1, min(self.top_k, self.compute.capacity))
        self.grouped = GroupedCpu(source, self.device, dtype, act)
        self.calibration: dict[str, float] = {}
        if self.cuda and miss == "auto":
            self.calibration = calibrate_miss(source, self.first_layer, self.host.slab[0, :], self.device, self.act)
        calib = self.calibration
        self.auto_cpu = bool(calib) and calib["cpu_expert_s"] < calib["transfer_expert_s"]
        # earlier points of the token (dense MLPs, the first MoE layer's attention) predict the first
        # MoE layer, which has no MoE layer before it; the earliest of them starts a forward pass
        sources = self.predictor.sources() if self.predictor is not None else []
        self._stop_listening = self.predictor.listen(self.before_block) if sources else None
        self.pass_start = min([_position(l, site) for l, site in sources] + [_position(self.first_layer, "mlp")])

    # ------------------------------------------------------------------ public
    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        if _position(layer, "mlp") == self.pass_start:
            self._new_pass(T)
        if self.trace is not None:
            self.trace.layer(layer, ids.tolist())
        self.transfers.reap()
        keys = [(layer, e) for e in sorted(set(ids.reshape(-1).tolist()))]  # one host copy, no unique kernel
        if self.future_check is not None:
            self.future_check.demand(keys)
        need = set(keys)
        tier = self.compute
        run = _Run(layer, stream=len(keys) > tier.capacity, cpu_miss=self._cpu_for_misses(T))
        run.predicted, run.prefetched = self.prefetches.settle(layer, need)
        for k in keys:
            tier.policy.on_access(k, k in tier.table)
        if self.access_log is not None:
            self.access_log.extend(keys)
        ok = False
        try:
            for k in keys:
                if k in tier.table:
                    if run.stream:
                        run.later.add(k)
                    else:
                        self._hold(run, tier, k)
                else:
                    run.pending.append(k)
            self._issue_pending(run)
            if self.predictor is not None and not run.stream:
                self._prefetch(layer, x, need)

            def fetch(e: int):
                return self._fetch(run, (layer, e))

            if self.grouped.applies(layer, x):
                one_call = not run.pending and not run.stream and not run.cpu_keys
                if one_call and self._all_resident(run, keys):
                    def fetch(e: int):  # noqa: F811 -- the decode steady state: nothing to wait for or release early
                        return self._fetch_resident(run, (layer, e))
                y = self.grouped.combine(layer, x, ids, weights, [e for _, e in keys], fetch, one_call)
            else:
                y = combine_experts(x, ids, weights, fetch, self.act)
            ok = True
        finally:
            self._end_run(run, ok)
        return y

    def before_block(self, layer: int, x: torch.Tensor, site: str) -> None:
        """A dense layer's MLP (site "mlp") or the first MoE layer's attention ("attn") is about to
        run on x, its normed input: prefetch the experts the next MoE layers' routers pick for x, so
        the first MoE layer is not a guaranteed cold miss. Called by the model (ExpertPredictor.listen)."""
        if _position(layer, site) == self.pass_start:
            self._new_pass(x.shape[0])
        self.transfers.reap()
        self._prefetch(layer, x, set(), site=site, skip_wide=True)

    def _prefetch(self, layer: int, x: torch.Tensor, need: set, site: str = "mlp", skip_wide: bool = False) -> None:
        assert self.predictor is not None
        self.prefetches.issue(self.predictor, layer, x, need, site, skip_wide, self.compute, self.host, self.gpu,
                              self.slots.acquire, self.slots.fill, self.trace)

    def report(self) -> dict:
        """The "cache" section of the run report."""
        return self.stats.cache_section()

    def tier_states(self) -> list[TierState]:
        """What each tier (GPU first, then RAM) holds right now."""
        return [t.state() for t in (self.gpu, self.host) if t is not None]

    def live(self) -> dict:
        """`report()` plus what `/stats` in chat shows beside it: slots in use per tier, slot size, policy."""
        return {**self.report(), "slots": {s.name: {"used": s.used, "capacity": s.capacity} for s in self.tier_states()},
                "slot_bytes": self.slot_bytes, "policy": self.policy_name}

    def drain(self) -> None:
        """Wait for every transfer still in flight (prefetches of the last token) and settle it."""
        self.transfers.drain()

    def close(self) -> None:
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None
        self.transfers.close()
        if self.trace is not None:
            self.trace.close()

    # ------------------------------------------------------------------ one layer call
    def _new_pass(self, T: int) -> None:
        self.stats.tokens += T
        if T > 1:
            self.stats.prefill_tokens += T
        else:
            self.stats.decode_tokens += T
        if self.trace is not None:
            self.trace.begin_pass(T)

    def _cpu_for_misses(self, T: int) -> bool:
        if self.gpu is None or T != 1:
            return False
        return self.miss == "cpu" or (self.miss == "auto" and self.auto_cpu)

    def _hold(self, run: _Run, tier: Tier, key: Key) -> None:
        tier.table.pin(key)
        run.held.append((tier, key))

    def _unhold(self, run: _Run, tier: Tier, key: Key) -> None:
        run.held.remove((tier, key))
        self._release(tier, key)

    def _release(self, tier: Tier, key: Key) -> None:
        """Drop one pin of `key`; a transient slot (or a failed transfer's) is freed with its last pin."""
        tier.table.unpin(key)
        self.transfers.purge(tier, key)
        if key in tier.table.transient and tier.table.pins[key] == 0:
            self.transfers.finish(tier, key)
            slot = tier.table.release(key)
            self.transfers.mark_slot_free(tier, slot)

    def _issue_pending(self, run: _Run, must: Key | None = None) -> None:
        """Give slots to the call's missing experts, in order, and start their transfers.

        Only `must` may block (waiting for an in-flight transfer to free a slot); the others are
        issued while slots are available without waiting, so they overlap earlier experts' compute.
        """
        tier = self.compute
        while run.pending:
            k = run.pending[0]
            block = k == must
            if run.cpu_miss:
                if not self.slots.ensure_host(k, block=block, demand=True):
                    return
                self._hold(run, self.host, k)
                run.cpu_keys.add(k)
            else:
                if run.stream and not block and len(tier.table.transient) >= self.stream_window:
                    return  # a wide prefill layer streams through a few slots: it must not flush the cache
                soft = {j for j in run.later if j != k}
                slot = self.slots.acquire(tier, k, soft=soft, transient=run.stream, block=block)
                if slot is None:
                    return
                self._hold(run, tier, k)
                run.issued.add(k)
                if not self.slots.fill(tier, k, demand=True, block=block):
                    self._unhold(run, tier, k)  # releases a transient slot
                    if k in tier.table:
                        tier.table.release(k)
                        tier.policy.on_remove(k)
                    return
            run.pending.popleft()
            if block:
                block = False

    def _fetch(self, run: _Run, key: Key):
        tier = self.compute
        if run.prev is not None:
            self._done_with(run, run.prev)
        run.prev = key
        if key in run.pending:
            self._issue_pending(run, must=key)
        elif key in run.cpu_keys or (tier, key) in run.held:
            self._issue_pending(run)  # already on its way: just keep the pipeline full
        else:  # stream mode: a key resident at the start, not held until its turn
            run.later.discard(key)
            if key in tier.table:
                self._hold(run, tier, key)
            else:  # evicted to make room for an earlier expert: fetch it again
                run.pending.appendleft(key)
                self._issue_pending(run, must=key)
        return self._ready(run, key)

    def _all_resident(self, run: _Run, keys: list) -> bool:
        """Every key of the call sat in the compute tier's cache when it was held and no transfer into
        it is in flight: each use will be a hit, and nothing can evict a held key before the call ends."""
        if run.issued or run.stream or run.cpu_keys:
            return False
        tier, inflight = self.compute, self.transfers.inflight
        transient = tier.table.transient
        return all((tier.name, k) not in inflight and k not in transient for k in keys)

    def _fetch_resident(self, run: _Run, key: Key):
        """`_fetch` of a call `_all_resident` accepted: the hit `_ready` would count, without its
        per-expert waits and early releases (the pins go at `_end_run`, the call's last step)."""
        st = self.stats
        st.use(run.layer, True)
        st.tiers[self.compute.name].hits += 1
        return self.slots.weights(self.compute, key, self.device, self.dtype)

    def _done_with(self, run: _Run, key: Key) -> None:
        for tier, k in list(run.held):
            if k == key:
                self._unhold(run, tier, k)

    def _ready(self, run: _Run, key: Key):
        st = self.stats
        if key in run.cpu_keys:
            t0 = time.perf_counter()
            self.transfers.finish(self.host, key)
            st.stall_s += time.perf_counter() - t0
            st.use(run.layer, False)
            st.tiers["gpu"].misses += 1
            st.cpu_computed += 1
            if key not in run.prefetched and run.predicted:
                st.uncovered_misses += 1
            return CpuExpert(self.slots.weights(self.host, key, torch.device("cpu"), torch.float32))
        tier = self.compute
        hit = key not in run.issued and self.transfers.arrived(tier, key)
        if (tier.name, key) in self.transfers.inflight:
            t0 = time.perf_counter()
            self.transfers.finish(tier, key)
            st.stall_s += time.perf_counter() - t0
        if key in run.prefetched:
            st.prefetch_late += not hit
        elif not hit and run.predicted:
            st.uncovered_misses += 1
        st.use(run.layer, hit)
        counters = st.tiers[tier.name]
        counters.hits += hit
        counters.misses += not hit
        if key in tier.table.transient:
            st.streamed_uses += 1
        return self.slots.weights(tier, key, self.device, self.dtype)

    def _end_run(self, run: _Run, ok: bool) -> None:
        held, run.held = run.held, []
        for tier, k in held:
            if not ok:
                self.transfers.finish(tier, k, swallow=True)
            self._release(tier, k)


def _position(layer: int, site: str) -> tuple[int, int]:
    """Execution order of a point in the model: a layer's attention input comes before its MLP's."""
    return (layer, 0 if site == "attn" else 1)
