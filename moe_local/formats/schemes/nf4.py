"""`nf4`: 4-bit NormalFloat codes (QLoRA) with one absmax scale per block, two codes per byte.

The 16 levels are the quantiles of a standard normal rescaled to [-1, 1] with an exact zero
(Dettmers et al. 2023, as shipped in bitsandbytes). Each weight becomes the index of the level
nearest to w / absmax(block). Implemented in plain torch so packs do not depend on bitsandbytes
or on a GPU. Blocks run along the input dimension like every other scheme here.
"""

from __future__ import annotations

import torch

from moe_local.formats import kernels_torch
from moe_local.formats.schemes.base import NibbleScheme, grouped, safe_div, store_scales
from moe_local.formats.schemes.bits import NF4_LEVELS, pack_nibbles


def nf4_levels(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


class NF4(NibbleScheme):
    name = "nf4"
    qmax = 1.0

    def _quantize_rows(self, w: torch.Tensor, imp: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """importance is ignored (absmax blocks, as in QLoRA)."""
        out_f, in_f = w.shape
        wg = grouped(w, self.group_size_for(in_f))
        scales = store_scales(wg.abs().amax(-1), self.scale_dtype, self.name, self.qmax)
        wn = safe_div(wg, scales.float()[..., None]).clamp_(-1.0, 1.0)
        levels = nf4_levels(w.device)
        q = torch.bucketize(wn, (levels[1:] + levels[:-1]) / 2)  # index of the nearest level
        return {"codes": pack_nibbles(q.reshape(out_f, -1)), "scales": scales}

    def _expand(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return kernels_torch.expand_nf4(
            self._codes(packed, shape), packed["scales"], shape[0], shape[1], self.group_size_for(shape[1])
        )

    def code_values(self, q: torch.Tensor, packed: dict[str, torch.Tensor]) -> torch.Tensor:
        return nf4_levels(q.device)[q.long()]
