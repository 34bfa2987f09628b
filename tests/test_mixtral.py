"""Mixtral parity with transformers, per-expert and fused expert layouts, sliding window."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny import assert_matches_reference, save_tiny


def mixtral_config(**kw):
    from transformers import MixtralConfig

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                max_position_embeddings=128, tie_word_embeddings=False)
    base.update(kw)
    return MixtralConfig(**base)


def test_mixtral_matches_transformers(tmp_path):
    ref = save_tiny(mixtral_config(), tmp_path)
    assert_matches_reference(tmp_path, ref, vocab=256)


def test_mixtral_sliding_window_matches_transformers(tmp_path):
    ref = save_tiny(mixtral_config(sliding_window=6), tmp_path)
    assert_matches_reference(tmp_path, ref, vocab=256)


def fuse_experts(path, prefix_fmt: str, names: tuple[str, str, str], layers: int, experts: int) -> None:
    """Rewrite a per-expert checkpoint into the fused 3-D layout (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    tensors = load_file(path / "model.safetensors")
    for layer in range(layers):
        p = prefix_fmt.format(layer)
        g, u, d = ([tensors.pop(f"{p}.{e}.{n}.weight") for e in range(experts)] for n in names)
        tensors[f"{p}.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b in zip(g, u)])
        tensors[f"{p}.down_proj"] = torch.stack(d)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_mixtral_fused_expert_layout_gives_same_logits(tmp_path):
    ref = save_tiny(mixtral_config(), tmp_path)
    fuse_experts(tmp_path, "model.layers.{}.block_sparse_moe.experts", ("w1", "w3", "w2"), 3, 8)
    assert_matches_reference(tmp_path, ref, vocab=256)
