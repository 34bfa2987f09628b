"""Sizes, dtypes and the few ways moe-local writes numbers: one copy of each, used by every layer.

- `parse_size`: the one size parser (`--gpu-mem 6GiB`, `--ram 512MiB`, `simulate --budget 9MiB`),
  so every flag accepts the same units (GB = 10^9, GiB = 2^30) and refuses with the same words;
- `format_bytes`, `format_count`, `layer_ranges`: how sizes, counts and layer lists are written;
- `DType` and its lookups: a dtype's name as `--dtype` and pack manifests spell it, its torch
  dtype, its safetensors header name and its width -- one table instead of one per module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from moe_local.errors import MoeLocalError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": KiB, "m": 10**6, "mb": 10**6, "mib": MiB,
          "g": 10**9, "gb": 10**9, "gib": GiB, "t": 10**12, "tb": 10**12, "tib": TiB}


def parse_size(text: str | int | float | None, flag: str = "--gpu-mem", *, allow_auto: bool = True) -> int | None:
    """'6GiB', '512 MiB', '1.5G', '4096' (bytes) -> bytes. None/''/'auto' -> None (use the default).

    allow_auto=False: a flag with no default to fall back on, where ''/'auto' is refused like any
    other non-size.
    """
    if text is None:
        return None
    if isinstance(text, (int, float)):
        if text < 0:
            raise MoeLocalError(f"{flag} must not be negative, got {text}")
        return int(text)
    s = str(text).strip().lower().replace("_", "")
    if s in ("", "auto") and allow_auto:
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise MoeLocalError(f"{flag} {text!r} is not a size; write e.g. 6GiB, 512MiB, 1.5GB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_bytes(n: float, round_up: bool = False) -> str:
    """1536 -> "1.50 KiB"; bytes below 1 KiB stay whole ("512 B").

    round_up: the figure shown is never below n (1.0051 MiB -> "1.01 MiB"), for minimums a user
    copies into a flag: the value printed as "at least X" must itself be accepted."""
    if round_up:
        for i, unit in enumerate(("B", "KiB", "MiB", "GiB", "TiB")):
            scale = 1024 ** i
            if abs(n) < scale * 1024 or unit == "TiB":
                if i == 0:
                    return f"{math.ceil(n)} B"
                return f"{math.ceil(n * 100 / scale - 1e-9) / 100:.2f} {unit}"
    return _scaled(n, 1024, ("B", "KiB", "MiB", "GiB", "TiB"), " ")


def format_count(n: float) -> str:
    """1_500_000 -> "1.50M"; counts below 1000 stay whole."""
    return _scaled(n, 1000, ("", "K", "M", "B", "T"), "")


def _scaled(n: float, step: int, units: tuple[str, ...], sep: str) -> str:
    for unit in units[:-1]:
        if abs(n) < step:
            break
        n /= step
    else:
        unit = units[-1]
    return f"{n:.0f}{sep}{unit}" if unit == units[0] else f"{n:.2f}{sep}{unit}"


def layer_ranges(layers: list[int], sep: str = ", ") -> str:
    """[1, 2, 3, 6] -> "1-3, 6" (for tables and messages)."""
    parts: list[str] = []
    start = prev = None
    for x in sorted(layers):
        if prev is not None and x == prev + 1:
            prev = x
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = x
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return sep.join(parts)


# --------------------------------------------------------------------------- dtypes
@dataclass(frozen=True)
class DType:
    name: str  # as --dtype, pack manifests and messages write it: "bfloat16"
    torch: torch.dtype
    safetensors: str  # as safetensors headers write it: "BF16"
    itemsize: int  # bytes per element


_TABLE = (
    DType("bool", torch.bool, "BOOL", 1),
    DType("uint8", torch.uint8, "U8", 1),
    DType("int8", torch.int8, "I8", 1),
    DType("int16", torch.int16, "I16", 2),
    DType("uint16", torch.uint16, "U16", 2),
    DType("int32", torch.int32, "I32", 4),
    DType("uint32", torch.uint32, "U32", 4),
    DType("int64", torch.int64, "I64", 8),
    DType("uint64", torch.uint64, "U64", 8),
    DType("float16", torch.float16, "F16", 2),
    DType("bfloat16", torch.bfloat16, "BF16", 2),
    DType("float32", torch.float32, "F32", 4),
    DType("float64", torch.float64, "F64", 8),
    DType("float8_e4m3fn", torch.float8_e4m3fn, "F8_E4M3", 1),
    DType("float8_e5m2", torch.float8_e5m2, "F8_E5M2", 1),
)
DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}
BY_TORCH: dict[torch.dtype, DType] = {d.torch: d for d in _TABLE}
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in _TABLE}
RUN_DTYPES = ("float32", "bfloat16", "float16")  # what a model computes in (--dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return BY_TORCH[dtype].name
