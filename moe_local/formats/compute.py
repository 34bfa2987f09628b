"""The one matmul every weight goes through: `linear(x, w, bias)`.

A weight is either a plain float tensor (any storage dtype: fp32, bf16, fp16) or a `PackedWeight`
(a quantized scheme). Model layers, shared experts, the LM head and routed experts all call this, so
the choice of kernel (the CPU C kernels, torch, Triton on CUDA) is made in one place, and a weight is
never turned into a float copy of itself outside the kernel that consumes it.

On the CPU, packed weights and bf16/fp16 weights under fp32 activations go through the C kernels
(formats/kernels_cpu.py); float weights in x's dtype through torch's matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_local.formats import kernels_cpu
from moe_local.formats.schemes import PackedWeight


def linear(x: torch.Tensor, w: "torch.Tensor | PackedWeight", bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ w.T (+ bias)` in x's dtype; x is [..., in], w is [out, in]."""
    if isinstance(w, torch.Tensor):
        if w.dtype != x.dtype and x.device.type == "cpu":  # bf16/fp16 weights, fp32 x: no float copy
            y = kernels_cpu.linear(x, w)
            if y is not None:
                return y if bias is None else y + bias
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), bias)
    y = w.linear(x)
    return y if bias is None else y + bias


__all__ = ["linear"]
