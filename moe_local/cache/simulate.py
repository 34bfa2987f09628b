"""Replay a routing trace through eviction policies, cache sizes and prefetch depths.

Why: a real offloaded run costs minutes per configuration and mixes hit rate with I/O timing; a
replay of the recorded routing isolates the one thing a policy controls -- which expert uses are
served from the cache -- in seconds, and compares it with the Belady optimum on the same sequence.

Model of the cache (the same one moe_local/cache/tiered.py implements for a tier):
- Steps are replayed in order, and within a step the MoE layers in order. A step is one decode
  token, or (with `include_prefill`) one prefill call, whose demand per layer is the union of its
  tokens' experts. A layer's distinct experts are demanded one after another; all of them are
  pinned while the layer runs, so a layer never evicts its own experts (a prefill layer wider than
  the cache streams the excess through without caching it).
- A demanded expert that is resident is a hit; otherwise it is a miss and is inserted, evicting the
  policy's victim when the cache is full.
- Global mode (default): one cache of `slots` expert slots shared by every layer, one policy instance.
  Per-layer mode: each MoE layer gets its own cache of `slots // n_layers` slots and its own policy.
- Prefetch (depth D > 0, needs `predicted` in the trace): after layer i's demand, for d = 1..D the
  ids predicted for layer i+d (made d layers ahead) are inserted without an access, nearest layer
  first. Prefetching never evicts the current layer's experts nor any predicted expert (prefetched or
  already resident) still waiting for its layer in this step; when every resident key is pinned the
  prediction is dropped. A demanded key that
  is resident because of a prefetch and not yet used counts as a hit and as a prefetch `used`;
  a prefetched key evicted (or still unused at the end) before any use counts as `wasted`.
  precision = used / issued; recall = used / (used + misses) = the share of expert loads the
  demand path would have had to wait for that prefetch moved off it.
Timing (arrived late, bandwidth) is outside this model: the simulator counts hits, not seconds.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from moe_local.cache.policies import POLICIES, make_policy
from moe_local.cache.trace import Trace, TraceToken, read_trace
from moe_local.errors import MoeLocalError
from moe_local.units import parse_size

Key = tuple[int, int]


@dataclass
class PrefetchStats:
    issued: int = 0
    used: int = 0
    wasted: int = 0
    dropped: int = 0  # predictions not inserted because every resident key was pinned
    precision: float = 0.0
    recall: float = 0.0


@dataclass
class SimResult:
    policy: str
    slots: int  # total across layers
    per_layer: bool
    prefetch_depth: int
    uses: int
    hits: int
    evictions: int
    layers: list[dict] = field(default_factory=list)  # {"layer", "uses", "hits", "hit_rate"}
    prefetch: PrefetchStats | None = None

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d


class _Cache:
    """One tier: a resident set of fixed capacity driven by an eviction policy."""

    def __init__(self, policy_name: str, capacity: int, future: Sequence[Key] | None) -> None:
        self.capacity = capacity
        self.policy = make_policy(policy_name, capacity, future=future)
        self.resident: set[Key] = set()
        self.evictions = 0

    def make_room(self, pinned: set[Key], on_evict: Callable[[Key], None]) -> bool:
        if len(self.resident) < self.capacity:
            return True
        victim = self.policy.victim(self.resident, pinned)
        if victim is None:
            return False
        self.resident.discard(victim)
        self.policy.on_remove(victim)
        self.evictions += 1
        on_evict(victim)
        return True


@dataclass(frozen=True)
class Step:
    """One model call as the cache sees it: per MoE layer, the distinct experts all its tokens use."""

    experts: list[list[int]]  # sorted distinct ids per moe_layers[i]
    predicted: dict[int, list[list[int] | None]]


def select_steps(trace: Trace, include_prefill: bool = False) -> list[Step]:
    """Decode tokens are one step each; the tokens of one prefill call (same "pass", or a run of
    consecutive prefill lines when the trace has no "pass") form one step whose demand per layer is
    the union of their experts -- exactly what the runtime asks its cache for."""
    groups: list[list[TraceToken]] = []
    for tok in trace.tokens:
        if tok.phase == "prefill" and not include_prefill:
            continue
        prev = groups[-1][-1] if groups else None
        same_pass = (
            prev is not None and tok.phase == "prefill" and prev.phase == "prefill"
            and tok.pass_id == prev.pass_id
        )
        if same_pass:
            groups[-1].append(tok)
        else:
            groups.append([tok])
    if not groups:
        what = "tokens" if include_prefill else "decode tokens (add --include-prefill to replay prefill)"
        raise MoeLocalError(f"trace has no {what}", trace.path)
    n = len(trace.moe_layers)
    steps: list[Step] = []
    for group in groups:
        experts = [sorted({e for tok in group for e in tok.experts[i]}) for i in range(n)]
        predicted: dict[int, list[list[int] | None]] = {}
        for tok in group:
            for d, per_layer in tok.predicted.items():
                merged = predicted.setdefault(d, [None] * n)
                for i, ids in enumerate(per_layer):
                    if ids is not None:
                        merged[i] = sorted(set(merged[i] or []) | set(ids))
        steps.append(Step(experts, predicted))
    return steps


def demand_sequence(trace: Trace, steps: Sequence[Step], layer_index: int | None = None) -> list[Key]:
    """The keys in the order the replay demands them (Belady's future)."""
    seq: list[Key] = []
    for step in steps:
        for i, ids in enumerate(step.experts):
            if layer_index is None or i == layer_index:
                seq.extend((trace.moe_layers[i], e) for e in ids)
    return seq


def step_prediction_depths(steps: Sequence[Step]) -> list[int]:
    """Depths with at least one prediction in the replayed steps."""
    return sorted({d for step in steps for d, v in step.predicted.items() if any(x is not None for x in v)})


def check_prefetch_depth(trace: Trace, depth: int, steps: Sequence[Step] | None = None) -> None:
    """Refuse a prefetch depth the trace has no predictions for.

    Why: replaying depth D reads predicted[1..D]; a trace recorded at depth 1 has nothing at 2..D,
    so the replay would silently give depth-1 numbers labelled depth D.
    """
    if depth <= 0:
        return
    held = step_prediction_depths(steps) if steps is not None else trace.prediction_depths
    if not held:
        raise MoeLocalError("--prefetch-depth needs router predictions in the trace ('predicted'), this one has none",
                            trace.path)
    missing = [d for d in range(1, depth + 1) if d not in held]
    if missing:
        raise MoeLocalError(
            f"--prefetch-depth {depth} needs router predictions for depths 1..{depth}; this trace holds depth "
            f"{', '.join(map(str, held))} only (record it with `generate --trace FILE --prefetch-depth {depth}`)", trace.path)


def future_from_trace(path: str | Path) -> list[Key]:
    """The demand sequence a TieredExperts will produce for the run a trace recorded -- what
    `--policy belady` needs as its future. The provider demands, per MoE layer call, the sorted
    distinct experts of all tokens of the pass: the replay's steps with prefill included."""
    trace = read_trace(path)
    return demand_sequence(trace, select_steps(trace, include_prefill=True))


def simulate(
    trace: Trace,
    policy: str,
    slots: int,
    *,
    per_layer: bool = False,
    prefetch_depth: int = 0,
    include_prefill: bool = False,
    steps: Sequence[Step] | None = None,
) -> SimResult:
    """Replay the trace through one policy at one size; see the module docstring for the model."""
    if steps is None:
        steps = select_steps(trace, include_prefill)
    layers = trace.moe_layers
    n = len(layers)
    minimum = trace.top_k
    cap = slots // n if per_layer else slots
    if cap < minimum:
        unit = "per layer" if per_layer else "in total"
        raise MoeLocalError(
            f"cache of {slots} slots gives {cap} {unit}; a layer needs {minimum} slots at once"
        )
    check_prefetch_depth(trace, prefetch_depth, steps)
    belady = policy == "belady"
    if per_layer:
        caches = [_Cache(policy, cap, demand_sequence(trace, steps, i) if belady else None) for i in range(n)]
    else:
        shared = _Cache(policy, cap, demand_sequence(trace, steps) if belady else None)
        caches = [shared] * n

    uses = [0] * n
    hits = [0] * n
    pf = PrefetchStats()
    unused_prefetch: set[Key] = set()  # prefetched, not yet demanded
    waiting: dict[Key, int] = {}  # prefetched key -> index of the layer it was predicted for (pinned until it ran)
    misses_total = 0

    def on_evict(key: Key) -> None:
        if key in unused_prefetch:
            unused_prefetch.discard(key)
            pf.wasted += 1

    def prefetch(step: Step, i: int, cache: _Cache | None, pinned: set) -> None:
        """Insert the predictions made at layer index i (-1: before the first MoE layer)."""
        for d in range(1, prefetch_depth + 1):
            j = i + d
            if j >= n:
                break
            pred = step.predicted.get(d)
            ids = pred[j] if pred else None
            if not ids:
                continue
            target = caches[j]
            for e in sorted(set(ids)):
                key = (layers[j], e)
                if key in target.resident:
                    waiting.setdefault(key, j)  # already here: protect it for its layer, nothing to issue
                    continue
                guard = (pinned | waiting.keys()) if target is cache else set(waiting)
                if not target.make_room(guard, on_evict):
                    pf.dropped += 1
                    continue
                target.resident.add(key)
                target.policy.on_insert(key)
                unused_prefetch.add(key)
                waiting[key] = j
                pf.issued += 1

    for step in steps:
        waiting.clear()
        prefetch(step, -1, None, set())
        for i in range(n):
            cache = caches[i]
            layer = layers[i]
            keys = [(layer, e) for e in step.experts[i]]
            pinned = set(keys)
            for key in [k for k, j in waiting.items() if j <= i]:
                del waiting[key]
            for key in keys:
                hit = key in cache.resident
                uses[i] += 1
                cache.policy.on_access(key, hit)
                if hit:
                    hits[i] += 1
                    if key in unused_prefetch:
                        unused_prefetch.discard(key)
                        pf.used += 1
                    continue
                misses_total += 1
                # demand outranks prefetch: evict an expert waiting for a later layer only if nothing else can go
                if not (cache.make_room(pinned | waiting.keys(), on_evict) or cache.make_room(pinned, on_evict)):
                    continue  # a prefill step wider than the cache: streamed through, not cached
                cache.resident.add(key)
                cache.policy.on_insert(key)
            prefetch(step, i, cache, pinned)
    pf.wasted += len(unused_prefetch)
    pf.precision = pf.used / pf.issued if pf.issued else 0.0
    pf.recall = pf.used / (pf.used + misses_total) if (pf.used + misses_total) else 0.0
    evictions = sum(c.evictions for c in caches[: (n if per_layer else 1)])
    return SimResult(
        policy=policy,
        slots=cap * n if per_layer else cap,
        per_layer=per_layer,
        prefetch_depth=prefetch_depth,
        uses=sum(uses),
        hits=sum(hits),
        evictions=evictions,
        layers=[
            {"layer": layers[i], "uses": uses[i], "hits": hits[i], "hit_rate": hits[i] / uses[i] if uses[i] else 0.0}
            for i in range(n)
        ],
        prefetch=pf if prefetch_depth > 0 else None,
    )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|/layer)?\s*$")


def parse_sizes(spec: str, trace: Trace) -> list[int]:
    """'8,16,32' (total slots) | '25%,50%' (of all experts) | '16/layer' (per layer x MoE layers)."""
    n, total = len(trace.moe_layers), trace.num_experts * len(trace.moe_layers)
    out: list[int] = []
    for part in spec.split(","):
        if not part.strip():
            continue
        m = _SIZE.match(part)
        if not m:
            raise MoeLocalError(
                f"--sizes: bad cache size {part.strip()!r}: use slots (32), a share (25%) or per layer (16/layer)"
            )
        value, unit = float(m.group(1)), m.group(2)
        if unit == "%":
            slots = round(total * value / 100)
        elif unit == "/layer":
            slots = round(value) * n
        else:
            if value != int(value):
                raise MoeLocalError(f"--sizes: bad cache size {part.strip()!r}: slot counts are whole numbers")
            slots = int(value)
        if slots < 1:
            raise MoeLocalError(f"cache size {part.strip()!r} is less than one slot")
        out.append(slots)
    if not out:
        raise MoeLocalError("--sizes is empty")
    return sorted(set(out))


def parse_policies(spec: str) -> list[str]:
    names = [p.strip().lower() for p in spec.split(",") if p.strip()]
    for name in names:
        if name not in POLICIES:
            raise MoeLocalError(f"unknown cache policy {name!r}; choose from {', '.join(POLICIES)}")
    if not names:
        raise MoeLocalError("--policy is empty")
    return list(dict.fromkeys(names))


@dataclass
class Recommendation:
    budget_bytes: int
    slots: int
    policy: str
    prefetch_depth: int
    hit_rate: float
    belady_hit_rate: float
    all_fit: bool

    def to_dict(self) -> dict:
        return asdict(self)


def min_slots(trace: Trace, per_layer: bool = False) -> int:
    """The smallest cache that can run a decode step: one layer's top-k (in every layer when per-layer)."""
    return trace.top_k * (len(trace.moe_layers) if per_layer else 1)


def budget_spend(trace: Trace) -> tuple[int, int]:
    """(bytes per slot, bytes the run's budget spent on everything but slots) for turning --budget
    into slots the way --ram / --gpu-mem did. A trace recorded by the tiered cache says both in its
    header ("budget": resident weights + KV cache [+ GPU workspace], and the page-rounded slot);
    an older or hand-made trace has only expert_bytes, and then the whole budget buys slots."""
    spend = trace.extra.get("budget")
    if isinstance(spend, dict):
        slot, fixed = spend.get("slot_bytes"), spend.get("fixed_bytes")
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (slot, fixed)) and slot > 0:
            return slot, fixed
        raise MoeLocalError("line 1: header field 'budget' must hold integers slot_bytes > 0 and fixed_bytes >= 0",
                            trace.path)
    return trace.expert_bytes, 0


def budget_slots(trace: Trace, budget_bytes: int, *, per_layer: bool = False) -> int:
    """Expert slots a byte budget buys (capped at all experts), or a one-line error with the minimum.

    The budget means what --ram (on a CPU) or --gpu-mem meant for the recorded run: the bytes the
    run spent besides expert slots are subtracted first (see budget_spend)."""
    if trace.expert_bytes <= 0:
        raise MoeLocalError("trace header has no expert_bytes; cannot turn --budget into slots", trace.path)
    slot, fixed = budget_spend(trace)
    slots = min(max(0, budget_bytes - fixed) // slot, trace.num_experts * len(trace.moe_layers))
    need = min_slots(trace, per_layer)
    if slots < need:
        besides = f" after {fixed} bytes of resident weights and KV cache" if fixed else ""
        raise MoeLocalError(
            f"budget of {budget_bytes} bytes holds {slots} experts of {slot} bytes{besides}; "
            f"the minimum is {need} ({fixed + need * slot} bytes)"
        )
    return slots


def recommend(
    trace: Trace,
    budget_bytes: int,
    policies: Iterable[str],
    depths: Iterable[int],
    *,
    per_layer: bool = False,
    include_prefill: bool = False,
    progress: Callable[[], None] | None = None,
) -> tuple[Recommendation, list[SimResult]]:
    """Best online policy + prefetch depth at the slot count a byte budget buys."""
    slots = budget_slots(trace, budget_bytes, per_layer=per_layer)
    total = trace.num_experts * len(trace.moe_layers)
    steps = select_steps(trace, include_prefill)
    results: list[SimResult] = []
    for name in policies:
        if name == "belady":
            continue
        for d in depths:
            results.append(simulate(trace, name, slots, per_layer=per_layer, prefetch_depth=d, steps=steps))
            if progress:
                progress()
    if not results:
        raise MoeLocalError("no online policy to recommend (belady needs the future and cannot run live)")
    opt = simulate(trace, "belady", slots, per_layer=per_layer, steps=steps)
    if progress:
        progress()
    # best hit rate; ties -> shallower prefetch (fewer wasted bytes), then the order given
    best = max(results, key=lambda r: (round(r.hit_rate, 6), -r.prefetch_depth))
    return (
        Recommendation(budget_bytes, slots, best.policy, best.prefetch_depth, best.hit_rate, opt.hit_rate,
                       slots >= total),
        results + [opt],
    )


# --------------------------------------------------------------------------- the `simulate` grid
DEFAULT_POLICIES = "lru,lfu-aging,arc,belady"
DEFAULT_SIZES = "12.5%,25%,50%"


@dataclass
class Grid:
    """Every replay `moe-local simulate` asked for: policies x sizes x (no prefetch, depth D)."""

    trace: Trace
    policies: list[str]
    slots: list[int]  # requested sizes, ascending
    depths: list[int]  # 0, and the --prefetch-depth if any
    per_layer: bool
    steps: list[Step]
    budget_bytes: int | None = None  # --budget: also recommend a policy and depth for this many bytes
    results: list[SimResult] = field(default_factory=list)

    @property
    def uses(self) -> int:
        return self.results[0].uses if self.results else 0

    def result(self, policy: str, slots: int, depth: int) -> SimResult:
        """The run for a requested size (per-layer runs round the total down to a multiple of the layers)."""
        n = len(self.trace.moe_layers)
        want = (slots // n) * n if self.per_layer else slots
        return next(r for r in self.results if r.policy == policy and r.prefetch_depth == depth and r.slots == want)


def plan_grid(trace: Trace, policy: str = DEFAULT_POLICIES, sizes: str | None = None, prefetch_depth: int = 0,
              budget: str | None = None, per_layer: bool = False, include_prefill: bool = False) -> Grid:
    """Parse and check every option against the trace before anything is replayed (one-line errors).

    Default sizes below the minimum (one layer's top-k) are raised to it rather than refused."""
    names = parse_policies(policy)
    need = min_slots(trace, per_layer)
    if sizes is None:
        slots = sorted({max(s, need) for s in parse_sizes(DEFAULT_SIZES, trace)})
    else:
        slots = parse_sizes(sizes, trace)
        if slots[0] < need:
            unit = f"{trace.top_k} per layer x {len(trace.moe_layers)} layers" if per_layer else "one layer's top_k"
            raise MoeLocalError(f"--sizes {slots[0]} is too small: a layer needs {trace.top_k} slots at once, "
                                f"so the minimum is {need} ({unit})")
    budget_bytes = parse_size(budget, "--budget", allow_auto=False)
    if budget_bytes is not None:
        budget_slots(trace, budget_bytes, per_layer=per_layer)
    steps = select_steps(trace, include_prefill)
    check_prefetch_depth(trace, prefetch_depth, steps)
    return Grid(trace, names, slots, [0] + ([prefetch_depth] if prefetch_depth > 0 else []), per_layer, steps,
                budget_bytes)


def grid_runs(grid: Grid) -> list[tuple[str, int, int]]:
    """(policy, slots, depth) of every replay; belady (offline, no prefetch) only without prefetch."""
    return [(name, slots, d) for slots in grid.slots for name in grid.policies for d in grid.depths
            if not (d > 0 and name == "belady")]


def run_grid(grid: Grid, progress: Callable[[], None] | None = None) -> Grid:
    """Replay every run of the grid (progress() after each one)."""
    for name, slots, d in grid_runs(grid):
        grid.results.append(simulate(grid.trace, name, slots, per_layer=grid.per_layer, prefetch_depth=d,
                                     steps=grid.steps))
        if progress:
            progress()
    return grid


def recommendation_candidates(grid: Grid) -> tuple[list[str], list[int]]:
    """The online policies and prefetch depths a --budget recommendation tries: the grid's online
    policies (all of them if only belady was asked for), and every depth 0..d that the trace holds
    predictions for at each level 1..d."""
    held = step_prediction_depths(grid.steps)
    depths = [d for d in range(0, max(held, default=0) + 1) if all(x in held for x in range(1, d + 1))]
    online = [n for n in grid.policies if n != "belady"] or ["lru", "lfu-aging", "arc"]
    return online, depths
