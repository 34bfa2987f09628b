"""Sequences: loading a model for running, KV cache sizing, sampling, generation, templates, timing."""
