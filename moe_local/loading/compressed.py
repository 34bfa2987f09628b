"""compressed-tensors "pack-quantized" integer weights, dequantized on load.

Kimi-K2.5 (and Kimi-K2-Thinking) ship their routed experts this way (quantization-aware trained
INT4): a weight `<p>.weight` is stored as three tensors,
- `<p>.weight_packed`: int32 [out, ceil(in * bits / 32)], each row's signed values offset by
  2^(bits-1) to unsigned and packed densely, element i at bits [i*bits, (i+1)*bits) of the row
  (little end first: for int4, element i is nibble i % 8 of word i // 8);
- `<p>.weight_scale`: [out, in / group] (bf16), one symmetric scale per group of inputs;
- `<p>.weight_shape`: int [2], the unpacked (out, in).
The value is q * scale. Like FP8 block scales, this is how the file stores the tensor, not a tensor
of its own, so `Checkpoint` lists `<p>.weight` and dequantizes it here (in float32: the codes and
scales are exact, nothing is rounded before the run dtype). Asymmetric variants (a
`weight_zero_point`) are refused rather than misread. The bit width and group size follow from the
shapes, whichever config key (top level or `text_config`) holds the quantization_config.
"""

from __future__ import annotations

import math
import sys

import torch

PACKED, SCALE, SHAPE, ZERO_POINT = "weight_packed", "weight_scale", "weight_shape", "weight_zero_point"


def packed_weights(names) -> dict[str, str]:
    """`<p>.weight` -> `<p>.` for every weight stored packed (all three companions present)."""
    names = set(names)
    out = {}
    for n in names:
        if n.endswith("." + PACKED):
            prefix = n[: -len(PACKED)]
            if prefix + SCALE in names and prefix + SHAPE in names:
                out[prefix + "weight"] = prefix
    return out


def companions(prefix: str) -> tuple[str, ...]:
    return tuple(prefix + c for c in (PACKED, SCALE, SHAPE, ZERO_POINT))


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Unsigned codes [rows, cols] (uint8 for widths dividing 8, else int32) from rows densely packed into
    int32 words; the signed value is code - 2^(bits-1)."""
    rows, words = packed.shape
    mask = (1 << bits) - 1
    if 8 % bits == 0 and sys.byteorder == "little":  # int4, int8, int2: read the words as their bytes
        raw = packed.contiguous().view(torch.uint8)  # [rows, 4 * words], least significant byte first
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((raw[:, :, None] >> shifts) & mask).reshape(rows, -1)[:, :cols]
    u = packed.to(torch.int64) & 0xFFFFFFFF  # the word's 32 bits, unsigned
    bit = torch.arange(cols, dtype=torch.int64) * bits
    word, offset = bit // 32, bit % 32
    lo = u[:, word] >> offset
    hi = u[:, torch.clamp(word + 1, max=words - 1)] << (32 - offset)  # a value split across two words
    return (torch.where(offset + bits > 32, lo | hi, lo) & mask).to(torch.int32)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """float32 [out, in] from the stored codes and group scales; ValueError if the shapes disagree."""
    rows, cols = shape
    if packed.dtype != torch.int32 or packed.ndim != 2 or packed.shape[0] != rows or cols <= 0:
        raise ValueError(f"packed codes {list(packed.shape)} ({packed.dtype}) do not hold a {rows}x{cols} weight")
    bits = round(packed.shape[1] * 32 / cols)
    if not 1 <= bits <= 8 or math.ceil(cols * bits / 32) != packed.shape[1]:
        raise ValueError(f"{packed.shape[1]} int32 words per row hold no whole bit width for {cols} values")
    if scale.ndim != 2 or scale.shape[0] != rows or cols % scale.shape[1]:
        raise ValueError(f"scales {list(scale.shape)} do not divide a {rows}x{cols} weight into groups")
    groups = scale.shape[1]
    q = unpack_int32(packed, bits, cols).reshape(rows, groups, cols // groups).float()
    q -= 1 << (bits - 1)
    return (q * scale.float()[:, :, None]).reshape(rows, cols)
