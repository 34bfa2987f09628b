"""Torch kernels that expand packed blocks for `Scheme.linear` on CPU and CUDA.

The schemes' `dequantize` methods are the readable references; these do the same arithmetic
(bit-identical float32 results, tested) with fewer passes over memory:

- byte -> value lookup tables replace shifts and divisions: one `index_select` (far faster than
  advanced indexing on CPU) turns each uint8 byte into its two nibbles, two NF4 levels or five
  trits as float32 (a pair of float32 is gathered as one int64);
- scale (and zero point) are applied in place on the grouped view, so a block is written once and
  updated twice instead of materialising a per-column scale matrix.

`Scheme.linear` expands a few output rows at a time (base.CHUNK_ELEMENTS) so the working set stays
in cache and memory use is bounded whatever the weight's size.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from moe_local.formats.schemes.bits import FP4_VALUES, NF4_LEVELS


@lru_cache(maxsize=None)
def _lut(kind: str, device: torch.device) -> torch.Tensor:
    """float32 [256, n] lookup table byte -> codes (a memo of constants, one per device)."""
    b = torch.arange(256, dtype=torch.int32)
    if kind == "nibbles":
        t = torch.stack((b & 15, b >> 4), dim=-1).float()
    elif kind == "nf4":
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
        t = levels[torch.stack((b & 15, b >> 4), dim=-1).long()]
    elif kind == "fp4":  # E2M1 values of the two nibbles (MXFP4 codes)
        values = torch.tensor(FP4_VALUES, dtype=torch.float32)
        t = values[torch.stack((b & 15, b >> 4), dim=-1).long()]
    elif kind == "trits":  # bytes 243..255 never occur; they decode to garbage digits harmlessly
        t = torch.stack([(b // p) % 3 - 1 for p in (1, 3, 9, 27, 81)], dim=-1).float()
    else:
        raise ValueError(kind)
    return t.to(device).contiguous()


def _lookup(kind: str, codes: torch.Tensor) -> torch.Tensor:
    """float32 [rows, bytes * n]: each byte replaced by its row of the table."""
    rows = codes.shape[0]
    table = _lut(kind, codes.device)
    if table.shape[1] == 2:  # a pair of float32 is one int64: a 1-D gather is ~4x faster on CPU
        table = table.view(torch.int64).reshape(-1)
        return table.index_select(0, codes.reshape(-1).int()).view(torch.float32).view(rows, -1)
    return table.index_select(0, codes.reshape(-1).int()).view(rows, -1)


def _finish(grouped: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    w = grouped.reshape(out_f, -1)
    return w if w.shape[1] == in_f else w[:, :in_f]


def expand_int8(codes: torch.Tensor, scales: torch.Tensor, out_f: int, in_f: int, g: int) -> torch.Tensor:
    w = codes.reshape(out_f, in_f).float()
    s = scales.reshape(out_f, -1).float()
    full = in_f // g
    if full:
        w[:, : full * g].view(out_f, full, g).mul_(s[:, :full, None])
    if full * g != in_f:
        w[:, full * g :].mul_(s[:, full:])
    return w


def expand_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                out_f: int, in_f: int, g: int) -> torch.Tensor:
    q = _lookup("nibbles", codes.reshape(out_f, -1)).view(out_f, -1, g)
    q.sub_(zeros.reshape(out_f, -1, 1)).mul_(scales.reshape(out_f, -1, 1))
    return _finish(q, out_f, in_f)


def expand_nf4(codes: torch.Tensor, scales: torch.Tensor, out_f: int, in_f: int, g: int) -> torch.Tensor:
    q = _lookup("nf4", codes).view(out_f, -1, g)
    q.mul_(scales.reshape(out_f, -1, 1))
    return _finish(q, out_f, in_f)


def expand_ternary(codes: torch.Tensor, scales: torch.Tensor, out_f: int, in_f: int, g: int) -> torch.Tensor:
    ng = scales.reshape(out_f, -1).shape[1]
    q = _lookup("trits", codes).view(out_f, -1)
    # The last byte of a row may hold fewer than five real trits: scale a strided view of the real
    # ones in place (no copy); F.linear takes the strided result as is.
    q[:, : ng * g].view(out_f, ng, g).mul_(scales.reshape(out_f, -1, 1))
    return q[:, :in_f]


def expand_mxfp4(codes: torch.Tensor, scales: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """MXFP4 (formats/schemes/mxfp4.py): each byte -> its two E2M1 values (one int64 gather), then
    every block of 32 times 2**(e - 127) in place. Products of an E2M1 value and a power of two are
    exact in float32, so this equals the scheme's `dequantize` bit for bit."""
    q = _lookup("fp4", codes.reshape(out_f, -1)).view(out_f, -1, 32)
    q.mul_(torch.exp2(scales.reshape(out_f, -1, 1).to(torch.float32) - 127.0))
    return _finish(q, out_f, in_f)
