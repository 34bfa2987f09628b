"""Counters and histograms of the server -> Prometheus text exposition format (version 0.0.4).

What a dashboard of an offloading runner needs next to the usual request figures: the expert
cache, live. The cache section is `provider.report()` (see cache/stats.py for what a use, a hit and
a prefetch outcome are); the engine snapshots it on its own thread after every token, so a scrape
never reads the counters while a layer is updating them, and a long reply shows progress.

Cache counters are cumulative over the server's life (the provider never resets them), so they are
exported as counters and rates are left to the dashboard (`rate(moe_local_expert_hits_total[1m])`);
ratios over the whole life are exported as gauges for a quick look.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

# Seconds. TTFT covers prefill (long prompts on a CPU: seconds); token latency is one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative (+Inf last)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


def _value(v: float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = (lambda s: str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


class Exposition:
    """Builds the text: one HELP and TYPE line per family, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str, samples: Iterable[tuple[dict, float]]) -> None:
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(labels)} {_value(v)}" for labels, v in samples]

    def one(self, name: str, kind: str, help: str, value: float) -> None:
        self.family(name, kind, help, [({}, value)])

    def histogram(self, name: str, help: str, h: Histogram) -> None:
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(list(h.buckets) + [math.inf], h.counts):
            running += count
            le = "+Inf" if math.isinf(bound) else repr(float(bound))
            self.lines.append(f'{name}_bucket{{le="{le}"}} {running}')
        self.lines += [f"{name}_sum {_value(h.total)}", f"{name}_count {h.n}"]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Metrics:
    """Everything /metrics reports. Request figures come from the loop, token figures from the engine."""

    def __init__(self, info: dict[str, str], cache_report: Callable[[], dict | None] | None = None) -> None:
        self.info = info
        self._cache_report = cache_report
        self._cache: dict | None = cache_report() if cache_report else None
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (method, path, status)
        self.generations: Counter[str] = Counter()  # finish: stop | length | cancelled | error
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.token_latency = Histogram(TOKEN_BUCKETS)
        self.queue_wait = Histogram(WAIT_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)

    # ------------------------------------------------------------ observations
    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, path, status)] += 1
            self.duration.observe(seconds)

    def observe_generation(self, outcome: str, *, prompt_tokens: int = 0, cached_tokens: int = 0,
                           completion_tokens: int = 0, ttft_s: float | None = None,
                           token_latencies_s: Iterable[float] = (), queue_wait_s: float | None = None) -> None:
        with self._lock:
            self.generations[outcome] += 1
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
            self.completion_tokens += completion_tokens
            if ttft_s is not None and completion_tokens:
                self.ttft.observe(ttft_s)
            for t in token_latencies_s:
                self.token_latency.observe(t)
            if queue_wait_s is not None:
                self.queue_wait.observe(queue_wait_s)

    def refresh_cache(self) -> None:
        """Snapshot the provider's counters (call on the engine thread, between tokens)."""
        if self._cache_report is not None:
            report = self._cache_report()
            with self._lock:
                self._cache = report

    # ------------------------------------------------------------ exposition
    def render(self, *, queue_depth: int, running: bool, max_queue: int, ctx_size: int, kv_tokens: int) -> str:
        with self._lock:
            x = Exposition()
            x.family("moe_local_info", "gauge", "The served model and how it runs (value is always 1).",
                     [(self.info, 1)])
            x.family("moe_local_requests_total", "counter", "HTTP requests answered, by method, path and status.",
                     [({"method": m, "path": p, "status": str(s)}, n) for (m, p, s), n in sorted(self.requests.items())])
            x.family("moe_local_generations_total", "counter",
                     "Generations by outcome: stop (EOS or stop string), length, cancelled (client left), error.",
                     [({"finish_reason": k}, self.generations.get(k, 0)) for k in ("stop", "length", "cancelled", "error")])
            x.one("moe_local_prompt_tokens_total", "counter", "Prompt tokens of finished generations.", self.prompt_tokens)
            x.one("moe_local_prompt_tokens_cached_total", "counter",
                  "Prompt tokens whose keys/values were reused from the previous request (not prefilled).",
                  self.cached_tokens)
            x.one("moe_local_completion_tokens_total", "counter", "Generated tokens.", self.completion_tokens)
            x.histogram("moe_local_ttft_seconds", "Time to first token: prefill and first sample (queue wait excluded).",
                        self.ttft)
            x.histogram("moe_local_token_latency_seconds", "Seconds between consecutive generated tokens.",
                        self.token_latency)
            x.histogram("moe_local_queue_wait_seconds", "Seconds a request waited for the model.", self.queue_wait)
            x.histogram("moe_local_request_duration_seconds", "Seconds from request to the end of the response.",
                        self.duration)
            x.one("moe_local_queue_depth", "gauge", "Requests waiting for the model.", queue_depth)
            x.one("moe_local_queue_capacity", "gauge", "Most requests that may wait (--max-queue).", max_queue)
            x.one("moe_local_requests_running", "gauge", "Generations running now (0 or 1).", int(running))
            x.one("moe_local_context_size_tokens", "gauge", "KV cache positions allocated (--ctx-size).", ctx_size)
            x.one("moe_local_kv_cache_tokens", "gauge", "Positions holding the previous sequence, reusable by the next.",
                  kv_tokens)
            if self._cache is not None:
                _cache_families(x, self._cache)
            return x.text()


def _cache_families(x: Exposition, c: dict) -> None:
    """The expert cache section (cache/stats.py `cache_section`) as metric families."""
    hits = sum(layer["hits"] for layer in c["layers"])
    x.one("moe_local_expert_uses_total", "counter", "Experts demanded by MoE layer calls.", c["uses"])
    x.one("moe_local_expert_hits_total", "counter",
          "Uses served from the compute tier without waiting on a transfer.", hits)
    x.one("moe_local_expert_hit_ratio", "gauge", "Expert hits / uses since the server started.", c["hit_rate"])
    x.family("moe_local_expert_layer_uses_total", "counter", "Expert uses per MoE layer.",
             [({"layer": str(l["layer"])}, l["uses"]) for l in c["layers"]])
    x.family("moe_local_expert_layer_hits_total", "counter", "Expert hits per MoE layer.",
             [({"layer": str(l["layer"])}, l["hits"]) for l in c["layers"]])
    tiers = sorted(c["tiers"].items())
    x.family("moe_local_cache_tier_hits_total", "counter", "Lookups of a tier that found the expert.",
             [({"tier": n}, t["hits"]) for n, t in tiers])
    x.family("moe_local_cache_tier_misses_total", "counter", "Lookups of a tier that did not.",
             [({"tier": n}, t["misses"]) for n, t in tiers])
    x.family("moe_local_cache_tier_hit_ratio", "gauge", "Hits / lookups of a tier since the server started.",
             [({"tier": n}, t["hits"] / (t["hits"] + t["misses"]) if t["hits"] + t["misses"] else 0.0)
              for n, t in tiers])
    x.family("moe_local_cache_tier_evictions_total", "counter", "Experts evicted from a tier.",
             [({"tier": n}, t["evictions"]) for n, t in tiers])
    x.family("moe_local_cache_tier_slots", "gauge", "Expert slots of a tier.", [({"tier": n}, t["capacity"]) for n, t in tiers])
    b = c["bytes"]
    x.family("moe_local_cache_bytes_moved_total", "counter", "Expert bytes copied, per link.",
             [({"link": "disk_to_ram"}, b["disk_to_ram"]), ({"link": "ram_to_gpu"}, b["ram_to_gpu"])])
    x.one("moe_local_cache_stall_seconds_total", "counter", "Seconds the model waited on expert transfers.",
          c["stall_s"])
    pf = c["prefetch"]
    for key, help in (("issued", "Prefetches started for predicted experts."),
                      ("used", "Prefetched experts the predicted layer then used."),
                      ("late", "Used prefetches that had not arrived in time."),
                      ("wasted", "Prefetched experts the predicted layer did not use.")):
        x.one(f"moe_local_prefetch_{key}_total", "counter", help, pf[key])
    x.one("moe_local_prefetch_precision", "gauge", "Prefetches used / issued since the server started.", pf["precision"])
    x.one("moe_local_prefetch_recall", "gauge",
          "Prefetches used / (used + misses no prefetch covered) since the server started.", pf["recall"])
    x.one("moe_local_expert_cpu_computed_total", "counter", "GPU misses computed on the CPU instead (--miss cpu).",
          c["cpu_computed"])
