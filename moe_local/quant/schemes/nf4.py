"""`nf4`: 4-bit NormalFloat codes (QLoRA) with one absmax scale per block, two codes per byte.

The 16 levels are the quantiles of a standard normal rescaled to [-1, 1] with an exact zero
(Dettmers et al. 2023, as shipped in bitsandbytes). Each weight becomes the index of the level
nearest to w / absmax(block). Implemented in plain torch so packs do not depend on bitsandbytes
or on a GPU. Blocks run along the input dimension like every other scheme here.
"""

from __future__ import annotations

import torch

from moe_local.quant import kernels_torch
from moe_local.quant.schemes.base import (
    Scheme, TensorSpecs, check_group_size, check_scale_dtype, grouped, n_groups, nibble_codes,
    safe_div, store_scales,
)
from moe_local.quant.schemes.bits import NF4_LEVELS, pack_nibbles, unpack_nibbles


def nf4_levels(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


class NF4(Scheme):
    name = "nf4"
    defaults = {"group_size": 64, "scale_dtype": "bfloat16"}
    qmax = 1.0
    group_multiple = 2  # two codes per byte: a group never splits a byte

    def _validate(self) -> None:
        check_group_size(self.name, self.params["group_size"], multiple_of=2)
        self.scale_dtype = check_scale_dtype(self.name, self.params["scale_dtype"])

    def tensor_specs(self, shape: tuple[int, int]) -> TensorSpecs:
        out_f, in_f = int(shape[0]), int(shape[1])
        g = self.group_size_for(in_f)
        ng = n_groups(in_f, g)
        return {"codes": ((out_f, ng * g // 2), torch.uint8), "scales": ((out_f, ng), self.scale_dtype)}

    def _quantize_rows(self, w: torch.Tensor, imp: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """importance is ignored (absmax blocks, as in QLoRA)."""
        out_f, in_f = w.shape
        wg = grouped(w, self.group_size_for(in_f))
        scales = store_scales(wg.abs().amax(-1), self.scale_dtype, self.name, self.qmax)
        wn = safe_div(wg, scales.float()[..., None]).clamp_(-1.0, 1.0)
        levels = nf4_levels(w.device)
        q = torch.bucketize(wn, (levels[1:] + levels[:-1]) / 2)  # index of the nearest level
        return {"codes": pack_nibbles(q.reshape(out_f, -1)), "scales": scales}

    def unpack_codes(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """uint8 [out, n_groups * g] level indices in 0..15 (padding included)."""
        return unpack_nibbles(self._codes(packed, shape))

    def _codes(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """Codes trimmed to this layout's row width (legacy packs padded narrow rows; see Int4)."""
        return nibble_codes(packed["codes"], shape, self.group_size_for(int(shape[1])))

    def _expand(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return kernels_torch.expand_nf4(
            self._codes(packed, shape), packed["scales"], shape[0], shape[1], self.group_size_for(shape[1])
        )

    def dequantize(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        out_f, in_f = shape
        g = self.group_size_for(in_f)
        q = self.unpack_codes(packed, shape).reshape(out_f, -1, g)
        s = packed["scales"].reshape(out_f, -1, 1).float()
        return (nf4_levels(q.device)[q.long()] * s).reshape(out_f, -1)[:, :in_f]
