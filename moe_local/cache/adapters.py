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
from moe_local.formats.schemes import PackedWeight

NAMES = ("gate", "up", "down")
BIASES = ("gate_bias", "up_bias", "down_bias")  # optional (gpt-oss)
ALIGN = 16  # between tensors (the pack writer's rule): every view is dtype-aligned

# (field, part, offset, shape, dtype): part is None for a plain tensor, else the packed tensor's name
Entry = tuple[str, "str | None", int, tuple[int, ...], torch.dtype]


def _tensors(w: ExpertWeights, name: str) -> dict[str | None, torch.Tensor]:
    """A field's tensors: {None: t} for a plain tensor, the packed parts of a packed weight
    (gpt-oss's MXFP4 checkpoint experts: codes + scales), {} for an absent bias."""
    t = getattr(w, name)
    if t is None or isinstance(t, torch.Tensor):
        return {} if t is None else {None: t}
    if isinstance(t, PackedWeight):
        return dict(t.packed)
    raise TypeError("adapters serialise plain tensors and formats.PackedWeight parts only")


def _layout(w: ExpertWeights) -> tuple[list[Entry], int]:
    entries, off = [], 0
    for name in NAMES + BIASES:
        for part, t in _tensors(w, name).items():
            entries.append((name, part, off, tuple(t.shape), t.dtype))
            off += t.numel() * t.element_size()
            off = -(-off // ALIGN) * ALIGN
    return entries, off


def _write(w: ExpertWeights, layout, out: torch.Tensor) -> None:
    tensors = {(name, part): t for name in NAMES + BIASES for part, t in _tensors(w, name).items()}
    for name, part, off, shape, dtype in layout:
        t = tensors[(name, part)].contiguous()
        n = t.numel() * t.element_size()
        out[off : off + n].copy_(t.reshape(-1).view(torch.uint8))


def _decode(buf: torch.Tensor, layout, like: ExpertWeights) -> ExpertWeights:
    """ExpertWeights viewing `buf`; packed fields are rebuilt like `like`'s (same scheme and shape)."""
    parts: dict[str, dict] = {}
    for name, part, off, shape, dtype in layout:
        n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        parts.setdefault(name, {})[part] = buf[off : off + n].view(dtype).view(shape)
    fields = {}
    for name, p in parts.items():
        model = getattr(like, name)
        fields[name] = p[None] if None in p else PackedWeight(model.scheme, p, model.shape)
    return ExpertWeights(**fields)


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
        self.first = source.load(self.moe_layers[0], 0)
        self.layout, self.nbytes = _layout(self.first)

    def read_into(self, layer: int, expert: int, out: torch.Tensor, verify: bool = True) -> None:
        _write(self.source.load(layer, expert), self.layout, out[: self.nbytes])

    def decode(self, buf: torch.Tensor, layer: int, expert: int) -> ExpertWeights:
        return _decode(buf, self.layout, self.first)

    def load(self, layer: int, expert: int) -> ExpertWeights:
        return self.source.load(layer, expert)
