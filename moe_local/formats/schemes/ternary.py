"""1.58-bit ternary schemes: codes in {-1, 0, +1}, five per byte (1.6 bits), one scale per group.

w ~= scale * code per group of `group_size` input channels (default 128). Two rules pick the
codes and the scale:

- `ternary-absmean` (the naive BitNet b1.58 rule): scale = mean|w| of the group,
  code = round(clip(w / scale, -1, 1)).
- `ternary` (error-minimising): choose the support (the weights coded +-1) and the scale that
  minimise ||w - scale * code||^2 exactly. For a fixed support S the best scale is mean|w| over S
  and the error is ||w||^2 - (sum_S |w|)^2 / |S|; for a fixed scale the best support is
  {|w| > scale/2}, a top-k set of |w|. So the optimum is the best of the g top-k sets: sort |w|
  descending, take cumulative sums, pick k maximising S_k^2 / k. Exact, O(g log g), vectorised.
  With `importance` (mean squared activation per input channel from calibration) it minimises
  sum_j imp_j (w_j - scale * code_j)^2 instead: the optimal support is still top-k by |w|, the
  scale is the imp-weighted mean of |w| over it, and the score is (sum imp|w|)^2 / sum imp.

All arithmetic runs on groups normalised by a power of two (exact) so huge weights cannot overflow
the sums; scales are stored in `scale_dtype` (bfloat16 by default: float32's range).
"""

from __future__ import annotations

import torch

from moe_local.formats import kernels_torch, kernels_triton
from moe_local.formats.schemes.base import GroupedScheme, group_counts, grouped, n_groups, safe_div, store_scales
from moe_local.formats.schemes.bits import pack_trits, trit_bytes, unpack_trits


def _pow2_normalise(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a [..., g] >= 0 -> (a / 2**e, 2**e as float64 [...]) with max(a / 2**e) in [0.5, 1)."""
    _, e = torch.frexp(a.amax(-1))
    factor = torch.exp2(-e.float())  # exact powers of two; 2**-128 is still representable
    return a * factor[..., None], torch.exp2(e.double())


class _TernaryBase(GroupedScheme):
    defaults = {"group_size": 128, "scale_dtype": "bfloat16"}
    qmax = 1.0

    def code_bytes(self, n: int) -> int:
        return trit_bytes(n)

    def unpack_codes(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """int8 [out, n_groups * g] codes in {-1, 0, 1} (padding included): the reference unpack."""
        out_f, in_f = int(shape[0]), int(shape[1])
        g = self.group_size_for(in_f)
        return unpack_trits(self._codes(packed, shape), n_groups(in_f, g) * g)

    def _expand(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return kernels_torch.expand_ternary(
            self._codes(packed, shape), packed["scales"], shape[0], shape[1], self.group_size_for(shape[1])
        )

    def code_values(self, q: torch.Tensor, packed: dict[str, torch.Tensor]) -> torch.Tensor:
        return q.float()

    def linear(self, x: torch.Tensor, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """Batch-1 CUDA decode may take the fused Triton GEMV (opt-in, see kernels_triton)."""
        if kernels_triton.wanted(x, shape[1]):
            return kernels_triton.ternary_gemv(
                x, self._codes(packed, shape), packed["scales"], shape, self.group_size_for(shape[1])
            )
        return super().linear(x, packed, shape)


class TernaryAbsmean(_TernaryBase):
    """The naive BitNet b1.58 rule, kept as the baseline the error-minimising rule is measured against."""

    name = "ternary-absmean"  # ignores `importance`: it is the rule without any search

    def _quantize_rows(self, w: torch.Tensor, imp: torch.Tensor | None) -> dict[str, torch.Tensor]:
        g = self.group_size_for(w.shape[1])
        wg = grouped(w, g)
        a, unit = _pow2_normalise(wg.abs())
        mean = a.sum(-1) / group_counts(w.shape[1], g, w.device)
        scales = store_scales(mean.double() * unit, self.scale_dtype, self.name, self.qmax)
        q = safe_div(wg, scales.float()[..., None]).clamp_(-1, 1).round_().to(torch.int8)
        return {"codes": pack_trits(q.reshape(q.shape[0], -1)), "scales": scales}


class Ternary(_TernaryBase):
    """Error-minimising threshold and scale per group; importance-weighted when calibration is given."""

    name = "ternary"

    def _quantize_rows(self, w: torch.Tensor, imp: torch.Tensor | None) -> dict[str, torch.Tensor]:
        g = self.group_size_for(w.shape[1])
        wg = grouped(w, g)
        a, unit = _pow2_normalise(wg.abs())
        a_sorted, order = a.sort(-1, descending=True)
        if imp is not None and float(imp.max()) > 0:
            ig = grouped((imp / imp.max())[None], g).expand_as(a)  # padded channels weigh 0
            i_sorted = ig.gather(-1, order)
            num = (i_sorted * a_sorted).cumsum(-1)
            den = i_sorted.cumsum(-1)
        else:
            num = a_sorted.cumsum(-1)
            den = torch.arange(1, g + 1, dtype=torch.float32, device=w.device).expand_as(a)
        score = torch.where(den > 0, num * num / den.clamp(min=1e-30), torch.zeros_like(num))
        best = score.argmax(-1, keepdim=True)  # k - 1 of the best top-k support
        s_norm = (num.gather(-1, best) / den.gather(-1, best).clamp(min=1e-30)).squeeze(-1)
        scales = store_scales(s_norm.double() * unit, self.scale_dtype, self.name, self.qmax)
        in_support = torch.arange(g, device=w.device).expand_as(a) <= best
        mask = torch.zeros_like(in_support).scatter_(-1, order, in_support)
        q = (torch.sign(wg) * mask * (scales[..., None] > 0)).to(torch.int8)
        return {"codes": pack_trits(q.reshape(q.shape[0], -1)), "scales": scales}
