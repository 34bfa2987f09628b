"""Unquantized passthrough schemes (`bf16`, `fp16`, `fp32`): lets any checkpoint be packed as is."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from moe_local.errors import MoeLocalError
from moe_local.formats.schemes.base import Scheme, TensorSpecs, check_weight


class FloatScheme(Scheme):
    """One tensor `weight` [out, in] in a float dtype; dequantize is a cast."""

    dtype: ClassVar[torch.dtype] = torch.bfloat16

    def tensor_specs(self, shape: tuple[int, int]) -> TensorSpecs:
        return {"weight": ((int(shape[0]), int(shape[1])), self.dtype)}

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        check_weight(w)
        finfo = torch.finfo(self.dtype)
        if finfo.max < torch.finfo(w.dtype).max and bool((w.abs() > finfo.max).any()):
            raise MoeLocalError(f"weight values up to {float(w.abs().max()):.3g} overflow {self.name}; use bf16 or fp32")
        return {"weight": w.detach().to("cpu", self.dtype).contiguous()}

    def dequantize(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return packed["weight"].float().reshape(shape)

    def linear(self, x: torch.Tensor, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        # float -> float32 -> x.dtype equals float -> x.dtype (float32 holds every bf16/fp16 value).
        w = packed["weight"].reshape(shape)
        if w.dtype == x.dtype:
            return F.linear(x, w)
        return super().linear(x, packed, shape)  # cast a few rows at a time

    def _expand(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return packed["weight"].reshape(shape).float()


class BF16(FloatScheme):
    name = "bf16"
    dtype = torch.bfloat16


class FP16(FloatScheme):
    name = "fp16"
    dtype = torch.float16


class FP32(FloatScheme):
    name = "fp32"
    dtype = torch.float32
