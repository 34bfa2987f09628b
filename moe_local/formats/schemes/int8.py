"""`int8`: symmetric 8-bit codes with one scale per output channel (group_size=None) or per group.

w ~= scale * code, code in [-127, 127], scale = absmax / 127 of the channel or group. Codes are
computed against the *stored* (rounded) scale, so the scale's storage precision only moves the grid,
it never adds an error of its own.
"""

from __future__ import annotations

import torch

from moe_local.formats import kernels_torch
from moe_local.formats.schemes.base import (
    Scheme, TensorSpecs, check_group_size, check_scale_dtype, grouped, n_groups, safe_div,
    store_scales,
)


class Int8(Scheme):
    name = "int8"
    defaults = {"group_size": None, "scale_dtype": "bfloat16"}
    qmax = 127.0

    def _validate(self) -> None:
        check_group_size(self.name, self.params["group_size"], allow_none=True)
        self.scale_dtype = check_scale_dtype(self.name, self.params["scale_dtype"])

    def _group(self, in_f: int) -> int:
        return int(self.group_size_for(in_f))  # per channel (None) = one group of the row's width

    def tensor_specs(self, shape: tuple[int, int]) -> TensorSpecs:
        out_f, in_f = int(shape[0]), int(shape[1])
        return {
            "codes": ((out_f, in_f), torch.int8),
            "scales": ((out_f, n_groups(in_f, self._group(in_f))), self.scale_dtype),
        }

    def _quantize_rows(self, w: torch.Tensor, imp: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """importance is ignored: at 8 bits the absmax grid is already near lossless."""
        out_f, in_f = w.shape
        g = self._group(in_f)
        wg = grouped(w, g)  # [out, ng, g]
        scales = store_scales(wg.abs().amax(-1) / self.qmax, self.scale_dtype, self.name, self.qmax)
        q = safe_div(wg, scales.float()[..., None]).round_().clamp_(-127, 127).to(torch.int8)
        codes = q.reshape(out_f, -1)[:, :in_f].contiguous()
        return {"codes": codes, "scales": scales}

    def _expand(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return kernels_torch.expand_int8(packed["codes"], packed["scales"], shape[0], shape[1], self._group(shape[1]))

    def dequantize(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        out_f, in_f = shape
        codes = packed["codes"].reshape(out_f, in_f)
        scales = packed["scales"].reshape(out_f, -1).float()
        g = self._group(in_f)
        per_col = scales.repeat_interleave(g, dim=1)[:, :in_f]
        return codes.float() * per_col
