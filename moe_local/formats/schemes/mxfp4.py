"""`mxfp4`: OCP Microscaling FP4, the format gpt-oss ships its routed experts in.

Each block of 32 input channels holds 32 E2M1 codes (4 bits: sign, 2 exponent bits, 1 mantissa
bit; values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) two per byte, low nibble first, and
one shared E8M0 scale byte `e` worth 2**(e - 127). That is exactly the hub layout
(`<proj>_blocks` uint8 [.., out, in/32, 16] and `<proj>_scales` uint8 [.., out, in/32], see
transformers' integrations/mxfp4.py), so a gpt-oss checkpoint's codes and scales are this scheme's
`codes` [out, in/2] and `scales` [out, in/32] byte for byte: loading and packing them is a reshape,
never a re-quantization.

`quantize` (a float weight -> MXFP4) follows the OCP MX spec: the shared exponent is
floor(log2(absmax of the block)) - 2 (E2M1's largest exponent), each element is rounded to the
nearest E2M1 value of w / 2**exp and clamped to +-6. 4.25 bits per weight.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from moe_local.errors import MoeLocalError
from moe_local.formats import kernels_torch
from moe_local.formats.schemes.base import NibbleScheme, TensorSpecs, grouped, n_groups
from moe_local.formats.schemes.bits import FP4_VALUES, pack_nibbles

BLOCK = 32  # the MX block size: fixed by the format
E8M0_BIAS = 127
_MAGNITUDES = FP4_VALUES[:8]


def fp4_values(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)


def e8m0_scales(scales: torch.Tensor) -> torch.Tensor:
    """float32 2**(e - 127) of uint8 exponents (e = 0 gives 2**-127, a float32 subnormal: exact)."""
    return torch.exp2(scales.to(torch.float32) - E8M0_BIAS)


class MXFP4(NibbleScheme):
    name = "mxfp4"
    defaults: ClassVar[dict] = {}
    qmax = 6.0

    def _validate(self) -> None:
        pass  # nothing to choose: block size and scale type are the format's

    def group_size_for(self, in_f: int) -> int:
        return BLOCK  # never narrowed: a block is what one scale byte covers, on disk and in the hub layout

    def tensor_specs(self, shape: tuple[int, int]) -> TensorSpecs:
        out_f, in_f = int(shape[0]), int(shape[1])
        ng = n_groups(in_f, BLOCK)
        return {"codes": ((out_f, ng * BLOCK // 2), torch.uint8), "scales": ((out_f, ng), torch.uint8)}

    def _quantize_rows(self, w: torch.Tensor, imp: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """importance is ignored (the scale is a power of two fixed by the block's absmax)."""
        out_f, in_f = w.shape
        wg = grouped(w, BLOCK)
        amax = wg.abs().amax(-1)
        # floor(log2(amax)) from the float32 exponent field, exact (frexp: amax = m * 2**e, m in [0.5, 1))
        exp = torch.frexp(amax).exponent.to(torch.int32) - 1 - 2
        exp = torch.where(amax > 0, exp, torch.full_like(exp, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)
        scaled = wg / torch.exp2(exp.float())[..., None]
        mags = torch.tensor(_MAGNITUDES, dtype=torch.float32, device=w.device)
        q = torch.bucketize(scaled.abs().clamp(max=6.0).contiguous(), (mags[1:] + mags[:-1]) / 2)  # nearest magnitude
        q = q | (torch.signbit(scaled).to(q.dtype) << 3)  # sign bit (of -0.0 too: dequantize -> quantize is exact)
        return {"codes": pack_nibbles(q.reshape(out_f, -1)), "scales": (exp + E8M0_BIAS).to(torch.uint8)}

    def code_values(self, q: torch.Tensor, packed: dict[str, torch.Tensor]) -> torch.Tensor:
        return fp4_values(q.device)[q.long()]

    def dequantize(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        out_f, in_f = shape
        q = self.unpack_codes(packed, shape).reshape(out_f, -1, BLOCK)
        s = e8m0_scales(packed["scales"].reshape(out_f, -1, 1))
        return (self.code_values(q, packed) * s).reshape(out_f, -1)[:, :in_f]

    def _expand(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return kernels_torch.expand_mxfp4(self._codes(packed, shape), packed["scales"], shape[0], shape[1])

    def check_native(self, packed: dict[str, torch.Tensor], shape: tuple[int, int], where: str) -> None:
        """A checkpoint's blocks/scales pair must match this layout exactly (they are used as they are)."""
        for part, (dims, dtype) in self.tensor_specs(shape).items():
            t = packed[part]
            if tuple(t.shape) != tuple(dims) or t.dtype != dtype:
                raise MoeLocalError(f"{where}: MXFP4 {part} has shape {tuple(t.shape)} {t.dtype}, "
                                    f"expected {tuple(dims)} {dtype}")
