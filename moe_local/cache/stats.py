"""Counters of the tiered cache -> the "cache" section of the run report (the routing trace is trace.py).

Definitions (also in the README):
- a *use* is one expert demanded by one MoE layer call (an expert picked by several tokens of a
  prefill chunk is one use);
- an effective *hit* is a use served from the compute tier (GPU, or RAM without a GPU) without
  waiting on a transfer; `hit_rate` = hits / uses;
- per tier, `hits`/`misses` count lookups of that tier (the RAM tier is looked up on GPU misses);
- a prefetch is *issued* when a predicted expert is not resident and gets a slot; *used* when the
  layer it was predicted for demands it; *late* when that use still had to wait for the transfer;
  *wasted* when that layer ran without demanding it. precision = used / issued; recall = used /
  (used + demanded misses that no prefetch covered, in layer calls a prediction was made for).
  `lookahead` says whether predictions were made at all: not when the compute tier holds every
  expert of the model (nothing is ever evicted there, so there is nothing to prefetch for).
- bytes: per link; `per_token` = all bytes moved / tokens run through the model.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class TierCounters:
    capacity: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def as_dict(self) -> dict:
        return {"capacity": self.capacity, "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


@dataclass
class LayerCounters:
    uses: int = 0
    hits: int = 0
    misses: int = 0


@dataclass
class CacheStats:
    tiers: dict[str, TierCounters] = field(default_factory=dict)
    layers: dict[int, LayerCounters] = field(default_factory=lambda: defaultdict(LayerCounters))
    uses: int = 0
    hits: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_late: int = 0
    prefetch_wasted: int = 0
    uncovered_misses: int = 0
    predicted_right: int = 0
    actual_scored: int = 0
    disk_to_ram: int = 0
    ram_to_gpu: int = 0
    stall_s: float = 0.0
    cpu_computed: int = 0
    tokens: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    streamed_uses: int = 0  # uses served through transient slots (a prefill layer wider than the cache)
    lookahead: bool = False  # the router look-ahead ran (off without a predictor or when every expert fits)

    def use(self, layer: int, hit: bool) -> None:
        self.uses += 1
        self.hits += hit
        lc = self.layers[layer]
        lc.uses += 1
        lc.hits += hit
        lc.misses += not hit

    def cache_section(self) -> dict:
        """The run report's "cache" object (runtime/report.py assembles the rest of the report)."""
        moved = self.disk_to_ram + self.ram_to_gpu
        issued, used = self.prefetch_issued, self.prefetch_used
        return {
            "hit_rate": self.hits / self.uses if self.uses else 0.0,
            "uses": self.uses,
            "tiers": {name: t.as_dict() for name, t in self.tiers.items()},
            "layers": [
                {"layer": l, "uses": c.uses, "hits": c.hits, "misses": c.misses,
                 "hit_rate": c.hits / c.uses if c.uses else 0.0}
                for l, c in sorted(self.layers.items())
            ],
            "prefetch": {
                "issued": issued, "used": used, "late": self.prefetch_late, "wasted": self.prefetch_wasted,
                "precision": used / issued if issued else 0.0,
                "recall": used / (used + self.uncovered_misses) if used + self.uncovered_misses else 0.0,
                "router_recall": self.predicted_right / self.actual_scored if self.actual_scored else 0.0,
                "lookahead": self.lookahead,
            },
            "bytes": {"disk_to_ram": self.disk_to_ram, "ram_to_gpu": self.ram_to_gpu,
                      "per_token": moved / self.tokens if self.tokens else 0.0},
            "tokens": {"prefill": self.prefill_tokens, "decode": self.decode_tokens},
            "stall_s": self.stall_s,
            "cpu_computed": self.cpu_computed,
            "streamed_uses": self.streamed_uses,
        }
