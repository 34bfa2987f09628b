"""Counters of the tiered cache -> the "cache" section of the run report, and the routing trace.

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
- bytes: per link; `per_token` = all bytes moved / tokens run through the model.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from moe_local.errors import MoeLocalError


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
    predicted: int = 0  # router-lookahead predictions (depth 1) scored against the real routing
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

    def use(self, layer: int, hit: bool) -> None:
        self.uses += 1
        self.hits += hit
        lc = self.layers[layer]
        lc.uses += 1
        lc.hits += hit
        lc.misses += not hit

    def cache_section(self) -> dict:
        """The run report's "cache" object (see notes/cache-contract.md)."""
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
            },
            "bytes": {"disk_to_ram": self.disk_to_ram, "ram_to_gpu": self.ram_to_gpu,
                      "per_token": moved / self.tokens if self.tokens else 0.0},
            "tokens": {"prefill": self.prefill_tokens, "decode": self.decode_tokens},
            "stall_s": self.stall_s,
            "cpu_computed": self.cpu_computed,
            "streamed_uses": self.streamed_uses,
        }


def run_report(*, model: str, device: str, dtype: str, options: dict, prompt_tokens: int, generated_tokens: int,
               ttft_s: float, prompt_s: float, token_latencies_s: Sequence[float], cache: dict | None) -> dict:
    """The whole `--stats-json` object (format "moe-local-run-report" v1) from what the runtime timed.

    ttft_s: prompt submitted -> first token; prompt_s: the prefill alone; token_latencies_s: one
    entry per generated token after the first. `cache` is `provider.report()` (None when resident).
    """
    lat = sorted(float(t) for t in token_latencies_s)

    def pct(p: float) -> float:
        if not lat:
            return 0.0
        return lat[min(len(lat) - 1, max(0, int(round(p / 100 * (len(lat) - 1)))))]

    gen_time = sum(lat)
    report = {
        "format": "moe-local-run-report", "version": 1,
        "model": model, "device": device, "dtype": dtype, "options": options,
        "tokens": {"prompt": int(prompt_tokens), "generated": int(generated_tokens)},
        "timings": {
            "ttft_s": float(ttft_s),
            "prompt_tps": prompt_tokens / prompt_s if prompt_s > 0 else 0.0,
            "gen_tps": len(lat) / gen_time if gen_time > 0 else 0.0,
            "token_latency_s": {"mean": gen_time / len(lat) if lat else 0.0, "p50": pct(50), "p90": pct(90),
                                "p99": pct(99)},
            "token_latencies_s": [float(t) for t in token_latencies_s],
        },
    }
    if cache is not None:
        report["cache"] = cache
    return report


def write_json_atomic(path: str | Path, obj: dict) -> Path:
    """Write to a temporary name, then rename: a crash never leaves half a report."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        tmp.replace(path)
    except OSError as exc:
        raise MoeLocalError(f"cannot write the run report: {exc.strerror}", path) from None
    return path


# --------------------------------------------------------------------------- routing trace
class TraceRecorder:
    """Writes the routing trace (`--trace FILE`, JSON Lines, format "moe-local-trace" v1).

    The provider sees one layer at a time; a token's line needs all its layers, so rows of the
    current forward pass are buffered and written when the next pass starts (or on close).
    Written to a temporary name and renamed on close, so a crash never leaves half a trace that
    looks whole.
    """

    def __init__(self, path: str | Path, model: str, num_experts: int, top_k: int,
                 moe_layers: Sequence[int], expert_bytes: int) -> None:
        self.path = Path(path)
        self.moe_layers = list(moe_layers)
        self.index = {l: i for i, l in enumerate(self.moe_layers)}
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.file = open(self.tmp, "w")
        except OSError as exc:
            raise MoeLocalError(f"cannot write the routing trace: {exc.strerror}", self.path) from None
        header = {"format": "moe-local-trace", "version": 1, "model": model, "num_experts": num_experts,
                  "top_k": top_k, "moe_layers": self.moe_layers, "expert_bytes": int(expert_bytes)}
        self.file.write(json.dumps(header) + "\n")
        self.t = 0
        self.passes = 0  # extra field "pass": which model call a token ran in (prefill may be chunked)
        self.rows: list[dict] = []

    def begin_pass(self, T: int) -> None:
        self.flush()
        phase = "prefill" if T > 1 else "decode"
        n = len(self.moe_layers)
        self.rows = [{"t": self.t + i, "phase": phase, "pass": self.passes, "experts": [None] * n}
                     for i in range(T)]
        self.t += T
        self.passes += 1

    def layer(self, layer: int, ids: list[list[int]]) -> None:
        i = self.index[layer]
        for row, token_ids in zip(self.rows, ids):
            row["experts"][i] = token_ids

    def predicted(self, depth: int, layer: int, ids: list[int]) -> None:
        """Prediction made `depth` MoE layers ahead for `layer`, attached to the pass's last token."""
        if not self.rows:
            return
        row = self.rows[-1]
        pred = row.setdefault("predicted", {}).setdefault(str(depth), [None] * len(self.moe_layers))
        pred[self.index[layer]] = ids

    def flush(self) -> None:
        for row in self.rows:
            self.file.write(json.dumps(row) + "\n")
        self.rows = []

    def close(self) -> None:
        if self.file.closed:
            return
        self.flush()
        self.file.close()
        self.tmp.replace(self.path)


def future_from_trace(path: str | Path) -> list[tuple[int, int]]:
    """The demand sequence a TieredExperts will produce for the run a trace recorded.

    The provider demands, per MoE layer call, the sorted distinct experts of all tokens of the pass;
    a prefill pass is a run of consecutive "prefill" lines, a decode pass one "decode" line. This is
    what `--policy belady` needs as its future.
    """
    lines = Path(path).read_text().splitlines()
    try:
        header = json.loads(lines[0])
        rows = [json.loads(s) for s in lines[1:] if s.strip()]
    except (IndexError, json.JSONDecodeError) as exc:
        raise MoeLocalError(f"not a moe-local routing trace ({exc})", path) from None
    if header.get("format") != "moe-local-trace":
        raise MoeLocalError("not a moe-local routing trace (bad header)", path)
    layers = header["moe_layers"]
    passes: list[list[dict]] = []
    for row in rows:
        if passes and "pass" in row and row["pass"] == passes[-1][0].get("pass"):
            passes[-1].append(row)
        elif "pass" not in row and row["phase"] == "prefill" and passes and passes[-1][0]["phase"] == "prefill":
            passes[-1].append(row)
        else:
            passes.append([row])
    future: list[tuple[int, int]] = []
    for p in passes:
        for i, layer in enumerate(layers):
            ids = sorted({e for row in p for e in (row["experts"][i] or [])})
            future.extend((layer, e) for e in ids)
    return future
