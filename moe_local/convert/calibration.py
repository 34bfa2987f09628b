"""Activation statistics for importance-weighted quantization.

A weight error on input channel j of a projection costs, on average, |error_j|^2 * E[x_j^2]: channels
that carry large activations matter more. So we run the unquantized model on calibration tokens and
record, for every routed expert and projection, the mean squared activation per input channel over
the tokens routed to that expert: `x` for gate/up, `act(gate x) * up x` for down. Schemes that can
use it (ternary) weight their per-group error by it. Experts that no calibration token reached get
no statistics (the scheme falls back to its unweighted rule).

Experts are read from the checkpoint's memory map on demand (not kept), so calibration needs the
non-expert weights in RAM plus one layer's active experts at a time, not the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moe_local.experts import ClampedSwiGLU, ExpertSource, activation, combine_experts, project
from moe_local.runtime.evaluate import DEFAULT_WINDOW, load_token_ids, windows
from moe_local.runtime.loader import load_model


@dataclass
class Calibration:
    """Per (layer, expert): sums of squared inputs per channel and the number of tokens seen."""

    sums: dict[tuple[int, int, str], torch.Tensor] = field(default_factory=dict)  # proj in {"gate", "down"}
    counts: dict[tuple[int, int], int] = field(default_factory=dict)
    tokens: int = 0
    source: str = ""

    def add(self, layer: int, expert: int, x: torch.Tensor, h: torch.Tensor) -> None:
        for proj, t in (("gate", x), ("down", h)):
            sq = t.float().pow(2).sum(0).cpu()
            key = (layer, expert, proj)
            self.sums[key] = self.sums[key] + sq if key in self.sums else sq
        self.counts[(layer, expert)] = self.counts.get((layer, expert), 0) + x.shape[0]

    def importance(self, layer: int, expert: int, proj: str) -> torch.Tensor | None:
        """Mean squared activation per input channel of `proj` (gate and up share their input)."""
        n = self.counts.get((layer, expert), 0)
        if n == 0:
            return None
        return self.sums[(layer, expert, "down" if proj == "down" else "gate")] / n

    def summary(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "experts_seen": len(self.counts)}


class _RecordingExpert:
    def __init__(self, weights, layer: int, expert: int, stats: Calibration) -> None:
        self.w, self.layer, self.expert, self.stats = weights, layer, expert, stats

    def __call__(self, x: torch.Tensor, act) -> torch.Tensor:
        w = self.w
        g, u = project(x, w.gate, w.gate_bias), project(x, w.up, w.up_bias)
        h = act.combine(g, u) if isinstance(act, ClampedSwiGLU) else act(g) * u
        self.stats.add(self.layer, self.expert, x, h)
        return project(h, w.down, w.down_bias)


class RecordingProvider:
    """An ExpertProvider that computes experts straight from the source and records their inputs."""

    def __init__(self, source: ExpertSource, act, device, dtype, stats: Calibration) -> None:
        self.source, self.act = source, activation(act)
        self.device, self.dtype, self.stats = device, dtype, stats

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        def fetch(e: int):
            w = self.source.load(layer, e).to(self.device, self.dtype)
            return _RecordingExpert(w, layer, e, self.stats)

        return combine_experts(x, ids, weights, fetch, self.act)


def calibrate(src: str | Path, tokens_path: str | Path, max_tokens: int = 4096, window: int = DEFAULT_WINDOW,
              device: str | None = "cpu", progress: Callable[[int], None] | None = None) -> Calibration:
    """Run the unquantized model at `src` over the first `max_tokens` ids of `tokens_path`."""
    stats = Calibration(source=str(tokens_path))

    def factory(source, model, dev, dt):
        return RecordingProvider(source, model.args.expert_act, dev, dt, stats)

    lm = load_model(src, device=device, dtype="float32", provider=factory)
    ids = load_token_ids(tokens_path, max_tokens, lm.config.get("vocab_size"))
    lm.model.setup_cache(window)
    with torch.inference_mode():
        for start, end in windows(ids.numel(), window):
            lm.model(ids[start:end].to(lm.device), 0)
            stats.tokens += end - start
            if progress is not None:
                progress(end - start)
    return stats
