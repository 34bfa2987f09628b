"""Bit packing of integer codes: two 4-bit codes per byte, five ternary codes per byte.

These are the exact reference unpackers: every kernel must produce the same integers. Codes are
packed along the last axis, in order: nibbles low-then-high; trits as base-3 digits, least
significant first (byte = sum_i (q_i + 1) * 3**i, at most 242 < 256).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRITS_PER_BYTE = 5

# The 16 NormalFloat-4 levels (QLoRA, as shipped in bitsandbytes): the `nf4` code -> value map.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# The 16 E2M1 (FP4) values by code (sign bit 3): the `mxfp4` code -> value map, as in the OCP MX spec.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_POW3 = (1, 3, 9, 27, 81)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2n] codes in 0..15 -> uint8 [..., n]; element 2j in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError("pack_nibbles needs an even number of codes per row")
    q = q.to(torch.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> uint8 [..., 2n] codes in 0..15."""
    return torch.stack((b & 15, b >> 4), dim=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])


def trit_bytes(n: int) -> int:
    """Bytes needed for n ternary codes."""
    return -(-n // TRITS_PER_BYTE)


def pack_trits(q: torch.Tensor) -> torch.Tensor:
    """int [..., L] codes in {-1, 0, 1} -> uint8 [..., ceil(L/5)]; the tail is padded with code 0."""
    n = q.shape[-1]
    nb = trit_bytes(n)
    d = (q.to(torch.int16) + 1)
    if nb * TRITS_PER_BYTE != n:
        d = F.pad(d, (0, nb * TRITS_PER_BYTE - n), value=1)
    d = d.reshape(*q.shape[:-1], nb, TRITS_PER_BYTE)
    byte = d[..., 0] + 3 * d[..., 1] + 9 * d[..., 2] + 27 * d[..., 3] + 81 * d[..., 4]
    return byte.to(torch.uint8).contiguous()


def unpack_trits(b: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """uint8 [..., nb] -> int8 [..., n] codes in {-1, 0, 1} (n defaults to 5*nb)."""
    v = b.to(torch.int16)
    digits = [(v // p) % 3 for p in _POW3]
    q = (torch.stack(digits, dim=-1) - 1).to(torch.int8)
    q = q.reshape(*b.shape[:-1], b.shape[-1] * TRITS_PER_BYTE)
    return q if n is None else q[..., :n]
