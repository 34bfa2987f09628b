"""Quantized formats for routed experts: schemes (pack/unpack, dequantize, kernels) and packs."""

from moe_local.formats.schemes import SCHEMES, PackedWeight, Scheme, get_scheme

__all__ = ["SCHEMES", "PackedWeight", "Scheme", "get_scheme"]
