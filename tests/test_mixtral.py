"""Mixtral parity with transformers, per-expert and fused expert layouts, sliding window."""

from __future__ import annotations

from tests.tiny import assert_matches_reference, fuse_experts, mixtral_config, save_tiny


def test_mixtral_matches_transformers(tmp_path):
    ref = save_tiny(mixtral_config(), tmp_path)
    assert_matches_reference(tmp_path, ref, vocab=256)


def test_mixtral_sliding_window_matches_transformers(tmp_path):
    ref = save_tiny(mixtral_config(sliding_window=6), tmp_path)
    assert_matches_reference(tmp_path, ref, vocab=256)


def test_mixtral_fused_expert_layout_gives_same_logits(tmp_path):
    ref = save_tiny(mixtral_config(), tmp_path)
    fuse_experts(tmp_path, "model.layers.{}.block_sparse_moe.experts", ("w1", "w3", "w2"), 3, 8)
    assert_matches_reference(tmp_path, ref, vocab=256)
