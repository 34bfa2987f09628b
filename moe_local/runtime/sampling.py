"""Next-token sampling with llama.cpp's semantics, one logits row at a time (batch 1).

Order (llama.cpp's default chain): repetition penalty -> top-k -> top-p -> min-p -> temperature ->
draw. Temperature 0 means greedy (argmax after the penalty). Filters mask logits with -inf, so
each one can be tested on a hand-made vector. Draws use a `torch.Generator` seeded per request, so
the same seed gives the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from moe_local.errors import GenerationError


@dataclass
class SamplingOptions:
    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at (-1 = all)
    seed: int | None = None

    def validate(self) -> None:
        for flag, value in (("--temperature", self.temperature), ("--top-p", self.top_p), ("--min-p", self.min_p),
                            ("--repeat-penalty", self.repeat_penalty)):
            if not math.isfinite(value):  # nan slips through every comparison below
                raise GenerationError(f"{flag} must be a finite number, got {value}")
        if self.temperature < 0:
            raise GenerationError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise GenerationError(f"--min-p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise GenerationError(f"--repeat-penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise GenerationError(f"--repeat-last-n must be >= -1 (-1 = all), got {self.repeat_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float,
                             last_n: int = 64) -> torch.Tensor:
    """llama.cpp / CTRL: each distinct recent token's logit is divided by `penalty` if > 0, else multiplied."""
    if penalty == 1.0 or not history:
        return logits
    recent = history if last_n < 0 else history[-last_n:] if last_n > 0 else []
    if not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value kept too, as a threshold does)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= p (always >= 1 token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least p times the most likely token's."""
    if p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < p * probs.max(), float("-inf"))


class Sampler:
    """Picks one token from one row of logits; owns the request's random generator."""

    def __init__(self, options: SamplingOptions, device: torch.device | str = "cpu") -> None:
        options.validate()
        self.o = options
        self.generator: torch.Generator | None = None
        if not options.greedy:
            # A CPU generator regardless of the logits' device: the same seed gives the same tokens on any device.
            self.generator = torch.Generator(device="cpu")
            if options.seed is not None:
                self.generator.manual_seed(options.seed)
            else:
                self.generator.seed()

    def filtered_logits(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """Penalty and truncation filters, then temperature: the distribution a draw is made from."""
        o = self.o
        logits = apply_repetition_penalty(logits.float(), history, o.repeat_penalty, o.repeat_last_n)
        logits = top_k_filter(logits, o.top_k)
        logits = top_p_filter(logits, o.top_p)
        logits = min_p_filter(logits, o.min_p)
        return logits / o.temperature

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        if self.o.greedy:
            logits = apply_repetition_penalty(logits.float(), history, self.o.repeat_penalty, self.o.repeat_last_n)
            return int(logits.argmax())
        probs = torch.softmax(self.filtered_logits(logits, history), dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))
