"""Conversion: checkpoints to moe-local packs (quantize), calibration statistics and scheme recipes."""
