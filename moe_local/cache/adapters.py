"""ExpertBytesSource adapters for expert stores that are not moe-local packs.

The tiered cache pages *byte ranges*. A pack (moe_local.formats.pack) already stores every expert as
one aligned range. `CheckpointBytes` gives the same view of a plain Hugging Face checkpoint (each
expert's tensors serialised back to back on the fly), so the cache also runs without a pack;
`FixedSizeBytes` is the size arithmetic of any store whose experts are all alike (the benchmark's
synthetic one). Tensors keep their stored dtype; `decode` views the buffer.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_local.experts import ExpertSource, ExpertWeights

NAMES = ("gate", "up", "down")
ALIGN = 16  # between tensors (the pack writer's rule): every view is dtype-aligned


def _layout(w: ExpertWeights) -> tuple[list[tuple[str, int, tuple[int, ...], torch.dtype]], int]:
    entries, off = [], 0
    for name in NAMES:
        t = getattr(w, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError("adapters serialise plain tensors only; packed experts come from a pack")
        entries.append((name, off, tuple(t.shape), t.dtype))
        off += t.numel() * t.element_size()
        off = -(-off // ALIGN) * ALIGN
    return entries, off


def _write(w: ExpertWeights, layout, out: torch.Tensor) -> None:
    for name, off, shape, dtype in layout:
        t = getattr(w, name).contiguous()
        n = t.numel() * t.element_size()
        out[off : off + n].copy_(t.reshape(-1).view(torch.uint8))


def _decode(buf: torch.Tensor, layout) -> ExpertWeights:
    parts = {}
    for name, off, shape, dtype in layout:
        n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        parts[name] = buf[off : off + n].view(dtype).view(shape)
    return ExpertWeights(parts["gate"], parts["up"], parts["down"])


class FixedSizeBytes:
    """The size-related ExpertBytesSource methods of a store whose experts all take `nbytes` bytes
    (a plain checkpoint's experts, the benchmark's synthetic store); `view` copies via `read_into`."""

    nbytes: int

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return self.nbytes

    def max_expert_nbytes(self) -> int:
        return self.nbytes

    def view(self, layer: int, expert: int) -> torch.Tensor:
        out = torch.empty(self.nbytes, dtype=torch.uint8)
        self.read_into(layer, expert, out)  # type: ignore[attr-defined]
        return out


class CheckpointBytes(FixedSizeBytes):
    """Any ExpertSource of plain tensors seen as byte ranges (serialised on each read; no checksum)."""

    def __init__(self, source: ExpertSource) -> None:
        self.source = source
        self.moe_layers = list(source.moe_layers)
        self.num_experts = source.num_experts
        self.layout, self.nbytes = _layout(source.load(self.moe_layers[0], 0))

    def read_into(self, layer: int, expert: int, out: torch.Tensor, verify: bool = True) -> None:
        _write(self.source.load(layer, expert), self.layout, out[: self.nbytes])

    def decode(self, buf: torch.Tensor, layer: int, expert: int) -> ExpertWeights:
        return _decode(buf, self.layout)

    def load(self, layer: int, expert: int) -> ExpertWeights:
        return self.source.load(layer, expert)
