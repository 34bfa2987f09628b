"""Timings of one generation request, in the units llama.cpp prints (tokens/s, ms).

Definitions, so numbers compare across runs:
- prompt tok/s = prompt tokens prefilled / prefill seconds (one forward over the prompt, minus the
  `cached_tokens` a previous request left in the KV cache: a chat's next turn only prefills its new
  tokens, and counting the cached ones would inflate the rate);
- TTFT = request start -> first generated token sampled (prefill + first sample);
- generated tok/s = decode forwards / their seconds (the first token comes from the prefill, so
  N generated tokens take N-1 decode forwards);
- token_latencies_s = per generated token, seconds since the previous one (the first is TTFT).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


def now(device: torch.device | None = None) -> float:
    """Wall clock after the device has finished queued work (otherwise CUDA timings lie)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # leading prompt tokens whose keys/values were reused, not recomputed
    generated_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0  # first generated token -> last generated token
    total_s: float = 0.0
    token_latencies_s: list[float] = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        return (self.prompt_tokens - self.cached_tokens) / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens,
            "prompt_tps": round(self.prompt_tps, 3),
            "gen_tps": round(self.gen_tps, 3),
            "ttft_s": round(self.ttft_s, 6),
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "total_s": round(self.total_s, 6),
            "token_latencies_s": [round(t, 6) for t in self.token_latencies_s],
        }

    def summary_line(self) -> str:
        """One line in the spirit of llama.cpp's timing print."""
        cached = f"{self.cached_tokens} cached, " if self.cached_tokens else ""
        return (f"prompt {self.prompt_tokens} tokens ({cached}{self.prompt_tps:.1f} tok/s), "
                f"generated {self.generated_tokens} tokens ({self.gen_tps:.1f} tok/s), "
                f"TTFT {self.ttft_s * 1000:.0f} ms")
