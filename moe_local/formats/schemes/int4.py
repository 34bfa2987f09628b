"""`int4`: asymmetric group-wise 4-bit codes, two per byte, with a scale and an integer zero point.

Per group of `group_size` input channels (default 64): the range [min(w, 0), max(w, 0)] is split
into 15 steps, scale = range / 15, zero = round(-min / scale) in 0..15, code = clamp(round(w /
scale) + zero, 0, 15), and w ~= scale * (code - zero). Keeping 0 in the range makes an exact zero
representable and lets a constant group round-trip. The zero point is stored as one uint8 per group
(0.125 bits per weight at g=64) rather than a float bias, so dequantization is integer-exact
before the single scale multiply.
"""

from __future__ import annotations

import torch

from moe_local.formats import kernels_torch, kernels_triton
from moe_local.formats.schemes import base
from moe_local.formats.schemes.base import NibbleScheme, TensorSpecs, grouped, safe_div, store_scales
from moe_local.formats.schemes.bits import pack_nibbles


class Int4(NibbleScheme):
    name = "int4"
    # |dequantized| <= |w| + scale / 2 and scale <= 2 * absmax / 15: only the scale's own overflow
    # matters, so the clamp in store_scales uses half the code range.
    qmax = 7.5

    def tensor_specs(self, shape: tuple[int, int]) -> TensorSpecs:
        specs = super().tensor_specs(shape)
        return {**specs, "zeros": (specs["scales"][0], torch.uint8)}  # one uint8 zero point per scale

    def _quantize_rows(self, w: torch.Tensor, imp: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """importance is ignored (a min/max grid has nothing to weigh)."""
        out_f, in_f = w.shape
        wg = grouped(w, self.group_size_for(in_f))
        lo = wg.amin(-1).clamp(max=0.0)
        hi = wg.amax(-1).clamp(min=0.0)
        scales = store_scales(hi / 15.0 - lo / 15.0, self.scale_dtype, self.name, self.qmax)  # no overflow
        s = scales.float()
        zeros = safe_div(-lo, s).round_().clamp_(0, 15)
        q = (safe_div(wg, s[..., None]).round_() + zeros[..., None]).clamp_(0, 15)
        # Weights within half a step of float32's max could dequantize to inf: step them inwards.
        value = (q.double() - zeros[..., None].double()) * s[..., None].double()
        q = q - (value > base.F32_MAX).float() + (value < -base.F32_MAX).float()
        return {
            "codes": pack_nibbles(q.reshape(out_f, -1)),
            "scales": scales,
            "zeros": zeros.to(torch.uint8).contiguous(),
        }

    def _expand(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return kernels_torch.expand_int4(
            self._codes(packed, shape), packed["scales"], packed["zeros"], shape[0], shape[1],
            self.group_size_for(shape[1]),
        )

    def code_values(self, q: torch.Tensor, packed: dict[str, torch.Tensor]) -> torch.Tensor:
        return q.float() - packed["zeros"].reshape(*q.shape[:2], 1).float()

    def linear(self, x: torch.Tensor, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """Batch-1 CUDA decode may take the fused Triton GEMV (opt-in, see kernels_triton)."""
        if kernels_triton.wanted(x, shape[1]):
            return kernels_triton.int4_gemv(
                x, self._codes(packed, shape), packed["scales"], packed["zeros"], shape, self.group_size_for(shape[1])
            )
        return super().linear(x, packed, shape)
