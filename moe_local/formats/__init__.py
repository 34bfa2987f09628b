"""Formats: quantization schemes (pack/unpack, dequantize, kernels) and the pack layout, writer and
reader. Knows nothing of models or tiers."""

from moe_local.formats.schemes import SCHEMES, PackedWeight, Scheme, get_scheme

__all__ = ["SCHEMES", "PackedWeight", "Scheme", "get_scheme"]
