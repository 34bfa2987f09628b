"""Fused dequantize-GEMV for batch-1 decode on CUDA, written in Triton (int4 and ternary).

At batch 1 a projection is memory-bound: reading the packed codes once and expanding them in
registers moves several times fewer bytes than dequantize-then-matmul, which reads the codes, then
writes and re-reads a 16- or 32-bit copy of the weight.

STATUS: written without access to a GPU. Verified on the CPU only: under Triton 3.7.1's
interpreter both kernels match `dequantize` + `F.linear` (float32 relative error ~2e-7; odd,
narrow and legacy-padded rows, junk in the padding codes, bf16/fp16 activations), and both lower
to sm_80/sm_90 cubins with no register spills (tests/test_schemes.py). Never yet run on a GPU,
hence still opt-in: `MOE_LOCAL_FUSED_GEMV=1` routes batch-1 CUDA calls of `int4`/`ternary` here;
everything else (and every normal CPU call) uses the torch reference path. Run
`pytest -m gpu tests/test_schemes.py` and `python benchmarks/quant_kernels.py` on a CUDA machine
before making it the default.

Importing this module never fails: without Triton (or CUDA) `available()` is simply False.
The one exception to "CUDA only" is Triton's CPU interpreter: when `TRITON_INTERPRET=1` was set
before this module was imported, `triton.jit` builds interpreted kernels that run on CPU tensors,
and `available()` accepts CPU tensors too, so the kernels' logic can be tested on a machine
without a GPU (tests/test_schemes.py). A normal CPU run sets neither variable and never leaves the
torch path.
Both kernels accumulate in float32 and return x's dtype; they agree with
`F.linear(x, dequantize(...).to(x.dtype))` to float tolerance, not bit for bit.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU machines
    HAVE_TRITON = False

ENV_FLAG = "MOE_LOCAL_FUSED_GEMV"
INTERPRET_FLAG = "TRITON_INTERPRET"
# Read once, like triton.jit does when it decorates the kernels below: setting the variable later
# would not turn compiled kernels into interpreted ones.
INTERPRETED = HAVE_TRITON and os.environ.get(INTERPRET_FLAG, "") == "1"


def available(x: torch.Tensor) -> bool:
    """True when a fused kernel can serve x: a CUDA tensor with Triton importable, or a CPU tensor
    under Triton's interpreter (testing only, see the module docstring)."""
    if not HAVE_TRITON:
        return False
    return x.is_cuda or (INTERPRETED and x.device.type == "cpu")


def wanted(x: torch.Tensor, in_f: int) -> bool:
    """The opt-in dispatch rule used by the schemes: batch-1 decode on CUDA with the flag set
    (or on the CPU under Triton's interpreter, with the flag set as well)."""
    return os.environ.get(ENV_FLAG, "") == "1" and available(x) and x.numel() == in_f


if HAVE_TRITON:

    @triton.jit
    def _int4_gemv_kernel(
        x_ptr, codes_ptr, scales_ptr, zeros_ptr, out_ptr,
        N, K, KB, NG,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
    ):
        # one program = BLOCK_N output rows; walk the row's bytes BLOCK_KB at a time
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for kb0 in range(0, KB, BLOCK_KB):
            cols = kb0 + tl.arange(0, BLOCK_KB)  # byte index; nibbles are k = 2*cols, 2*cols + 1
            cmask = cols < KB
            m2 = rmask[:, None] & cmask[None, :]
            b = tl.load(codes_ptr + rows[:, None] * KB + cols[None, :], mask=m2, other=0).to(tl.int32)
            k_lo = 2 * cols
            x_lo = tl.load(x_ptr + k_lo, mask=k_lo < K, other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptr + k_lo + 1, mask=(k_lo + 1) < K, other=0.0).to(tl.float32)
            grp = k_lo // GROUP  # GROUP is even: both nibbles of a byte share a group
            sidx = rows[:, None] * NG + grp[None, :]
            s = tl.load(scales_ptr + sidx, mask=m2, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + sidx, mask=m2, other=0).to(tl.float32)
            lo = (b & 15).to(tl.float32) - z
            hi = (b >> 4).to(tl.float32) - z
            acc += tl.sum(s * (lo * x_lo[None, :] + hi * x_hi[None, :]), axis=1)
        tl.store(out_ptr + rows, acc, mask=rmask)

    @triton.jit
    def _ternary_gemv_kernel(
        x_ptr, codes_ptr, scales_ptr, out_ptr,
        N, K, KB, NG,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for kb0 in range(0, KB, BLOCK_KB):
            cols = kb0 + tl.arange(0, BLOCK_KB)  # byte index; trits are k = 5*cols + i
            cmask = cols < KB
            m2 = rmask[:, None] & cmask[None, :]
            b = tl.load(codes_ptr + rows[:, None] * KB + cols[None, :], mask=m2, other=121).to(tl.int32)
            for i in tl.static_range(5):
                k = 5 * cols + i
                kmask = k < K
                xk = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
                s = tl.load(
                    scales_ptr + rows[:, None] * NG + (k // GROUP)[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0,
                ).to(tl.float32)
                q = (b % 3 - 1).to(tl.float32)  # least significant base-3 digit first
                b = b // 3
                acc += tl.sum(q * s * xk[None, :], axis=1)
        tl.store(out_ptr + rows, acc, mask=rmask)


# Rows per program and code bytes per step (4 warps). Checked without a GPU by compiling for sm_90
# with Triton 3.7's ptxas: at 32 x 128 the ternary kernel needed 255 registers and spilled 212
# bytes, and an expert's 1408 rows made only 44 programs for 132 SMs; 16 x 128 spills nothing
# (int4 96 registers, ternary 209) and doubles the programs. Not yet tuned on a GPU: see
# benchmarks/quant_kernels.py.
BLOCK_N, BLOCK_KB = 16, 128


def _gemv(kernel, x: torch.Tensor, packed: tuple[torch.Tensor, ...], shape: tuple[int, int],
          group_size: int) -> torch.Tensor:
    """Run one of the kernels above: `packed` = (codes, scales[, zeros]) in the kernel's order."""
    n, k = shape
    codes, scales = packed[0], packed[1]
    out = torch.empty(n, device=x.device, dtype=torch.float32)
    kernel[(triton.cdiv(n, BLOCK_N),)](
        x.reshape(-1).contiguous(), *(t.contiguous() for t in packed), out,
        n, k, codes.shape[-1], scales.shape[-1],
        GROUP=group_size, BLOCK_N=BLOCK_N, BLOCK_KB=BLOCK_KB,
    )
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def int4_gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              shape: tuple[int, int], group_size: int) -> torch.Tensor:
    """x [in] (or [1, in]) -> [out] (same leading dims), int4 codes expanded in registers."""
    return _gemv(_int4_gemv_kernel, x, (codes, scales, zeros), shape, group_size)


def ternary_gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                 shape: tuple[int, int], group_size: int) -> torch.Tensor:
    """x [in] (or [1, in]) -> [out], ternary codes (five per byte) expanded in registers."""
    return _gemv(_ternary_gemv_kernel, x, (codes, scales), shape, group_size)
