"""Quantization schemes for routed-expert weights, and the packed weight the expert seam runs.

    scheme = get_scheme("int4", group_size=64)
    packed = scheme.quantize(w)                 # {"codes": uint8, "scales": bf16, "zeros": uint8}
    y = PackedWeight(scheme, packed, w.shape).linear(x)

See base.py for what a scheme is and docs/pack-format.md for how a pack stores its tensors.

Storage per weight, scales and zero points included (Mixtral expert 14336x4096; all scales bf16):

    scheme            params           tensors                               bits/weight
    bf16 / fp16 / fp32                 weight                                16 / 16 / 32
    int8              group_size=None  codes int8, scales [out, 1]            8.004
    int8              group_size=128   codes int8, scales [out, in/128]       8.125
    int4              group_size=64    codes u8 (2/byte), scales, zeros u8    4.375 (g32 4.75, g128 4.19)
    nf4               group_size=64    codes u8 (2/byte), scales              4.25
    mxfp4             (block 32)       codes u8 (2/byte), e8m0 scales u8      4.25 (gpt-oss's hub layout)
    ternary(-absmean) group_size=128   codes u8 (5/byte), scales              1.727 (1.6 + 0.125 + row pad)

`group_size` is an upper bound: a weight whose rows are narrower than a group uses one group of
the row's width (`Scheme.group_size_for`), so e.g. a 256x64 ternary down projection at g128 costs
1.875 bits/weight, not the 2.33 a row padded to 128 codes would.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_local.errors import MoeLocalError
from moe_local.formats import kernels_cpu
from moe_local.formats.schemes.base import Scheme, TensorSpecs
from moe_local.formats.schemes.floats import BF16, FP16, FP32
from moe_local.formats.schemes.int4 import Int4
from moe_local.formats.schemes.int8 import Int8
from moe_local.formats.schemes.mxfp4 import MXFP4
from moe_local.formats.schemes.nf4 import NF4
from moe_local.formats.schemes.ternary import Ternary, TernaryAbsmean

SCHEMES: dict[str, type[Scheme]] = {
    cls.name: cls for cls in (BF16, FP16, FP32, Int8, Int4, NF4, MXFP4, Ternary, TernaryAbsmean)
}


def get_scheme(name: str, **params: Any) -> Scheme:
    """Build a scheme by name; unknown names and parameters are a one-line MoeLocalError."""
    cls = SCHEMES.get(name)
    if cls is None:
        raise MoeLocalError(f"unknown quantization scheme {name!r} (valid: {', '.join(SCHEMES)})")
    return cls(**params)


class PackedWeight:
    """A weight kept packed; implements moe_local.experts.PackedLinear.

    `packed` may view slices of a larger buffer (mmap, pinned slot, GPU slot): nothing here copies
    it; the scheme's kernel expands it only inside `linear`.
    """

    def __init__(self, scheme: Scheme, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> None:
        self.scheme = scheme
        self.packed = packed
        self.shape = (int(shape[0]), int(shape[1]))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """On the CPU the C kernels multiply straight from the packed bytes (kernels_cpu); the
        scheme's torch path serves everything else (CUDA, the extension not built)."""
        y = kernels_cpu.linear(x, self) if x.device.type == "cpu" else None
        return self.scheme.linear(x, self.packed, self.shape) if y is None else y

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in] (reference path; tests and `eval --dequantized`)."""
        return self.scheme.dequantize(self.packed, self.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.packed.values())).device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedWeight":
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.packed.items()}
        return PackedWeight(self.scheme, moved, self.shape)

    def __repr__(self) -> str:
        return f"PackedWeight({self.scheme!r}, shape={self.shape}, nbytes={self.nbytes})"


__all__ = ["SCHEMES", "PackedWeight", "Scheme", "TensorSpecs", "get_scheme"]
