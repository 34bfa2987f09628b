"""MiniMax-M2 parity with transformers (`minimax_m2`): q/k RMS norms over the whole projection, partial
rotary (the hub's legacy `rotary_dim` and transformers' `partial_rotary_factor`), sigmoid routing
with the correction bias stored beside the gate, the hub config's fixed choices checked, both expert
layouts, an INT4 pack under a tight tiered budget, and `inspect` at MiniMax-M2's size."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.errors import ConfigError
from moe_local.loading.checkpoint import Checkpoint
from moe_local.models import build_model
from moe_local.models.weights import weight_refs
from moe_local.runtime.loader import load_model
from tests.family_checks import check_pack_tiered_matches_resident, inspect_config_only
from tests.tiny import PROMPT_LEN, VOCAB, YARN, assert_matches_reference, fuse_experts, minimax_m2_config, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread on a shared box (conftest)


def prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- parity
def test_minimax_m2_matches_transformers(tmp_path):
    ref = save_tiny(minimax_m2_config(), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    m = lm.model
    assert m.args.moe_layers == [0, 1, 2] and m.rope.cos.shape[-1] == 12  # RoPE on 12 of 24 dims
    attn = m.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (4 * 24,) and attn.k_norm.weight.shape == (2 * 24,)  # whole projections
    refs = {r.param: r.name for r in weight_refs(m, Checkpoint(tmp_path))}
    assert refs["model.layers.2.block_sparse_moe.gate.e_score_correction_bias"] == \
        "model.layers.2.block_sparse_moe.e_score_correction_bias"
    assert torch.equal(m.model.layers[2].block_sparse_moe.gate.e_score_correction_bias,
                       ref.model.layers[2].mlp.e_score_correction_bias)


def test_minimax_m2_options_match_transformers(tmp_path):
    """What changes the math beyond the default: partial_rotary_factor in rope_parameters (it wins over
    rotary_dim), YaRN, MHA with a head_dim unlike hidden / heads, top-3 of 16."""
    rope = {**YARN, "partial_rotary_factor": 0.25}
    cfg = minimax_m2_config(rope_parameters=rope, num_key_value_heads=4, num_local_experts=16, num_experts_per_tok=3)
    ref = save_tiny(cfg, tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert lm.model.args.partial_rotary_dim == 6


def test_minimax_m2_hub_config_keys_match_transformers(tmp_path):
    """The hub config: `rotary_dim` and `rope_theta` at the top level (no rope_parameters), plus the keys
    naming what transformers hard-codes, set to those values; the same model must come out."""
    ref = save_tiny(minimax_m2_config(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg.update(rope_theta=theta, rotary_dim=12, use_qk_norm=True, qk_norm_type="per_layer", scoring_func="sigmoid",
               use_routing_bias=True, shared_intermediate_size=0, attn_type_list=[1, 1, 1])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert lm.model.args.partial_rotary_dim == 12


def test_minimax_m2_fused_expert_layout_matches_transformers(tmp_path):
    ref = save_tiny(minimax_m2_config(), tmp_path)
    fuse_experts(tmp_path, "model.layers.{}.block_sparse_moe.experts", ("w1", "w3", "w2"), 3, 8)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert all(lm.source.is_fused(layer) for layer in range(3))


def test_routing_bias_stays_float32_in_bfloat16(tmp_path):
    save_tiny(minimax_m2_config(), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="bfloat16")
    assert lm.model.model.layers[0].block_sparse_moe.gate.e_score_correction_bias.dtype == torch.float32
    lm.model.setup_cache(PROMPT_LEN)
    assert torch.isfinite(lm.model(prompt(), 0)).all()


# --------------------------------------------------------------------------- packs, tiers, look-ahead
def test_int4_pack_tiered_budget_gives_resident_tokens(tmp_path):
    save_tiny(minimax_m2_config(num_hidden_layers=2), tmp_path / "ckpt")
    check_pack_tiered_matches_resident(tmp_path / "ckpt", tmp_path, prompt().tolist())


# --------------------------------------------------------------------------- config handling
def test_config_errors_name_the_key():
    cfg = minimax_m2_config().to_dict()
    for bad, words in (({"scoring_func": "softmax"}, "scoring_func"), ({"use_qk_norm": False}, "use_qk_norm"),
                       ({"qk_norm_type": "per_head"}, "qk_norm_type"), ({"use_routing_bias": False}, "use_routing_bias"),
                       ({"shared_intermediate_size": 64}, "shared_intermediate_size"),
                       ({"rope_parameters": None, "rotary_dim": 13}, "rotary_dim")):
        with pytest.raises(ConfigError, match=words) as info:
            build_model({**cfg, **bad})
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- inspect at real sizes
MINIMAX_M2 = {  # MiniMaxAI/MiniMax-M2 config.json (auto_map, attn_type_list and the FP8 quantization_config left out)
    "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "attention_dropout": 0.0, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 1536,
    "max_position_embeddings": 196608, "mtp_transformer_layers": 1, "num_attention_heads": 48,
    "num_experts_per_tok": 8, "num_hidden_layers": 62, "num_key_value_heads": 8, "num_local_experts": 256,
    "num_mtp_modules": 3, "output_router_logits": False, "qk_norm_type": "per_layer", "rms_norm_eps": 1e-06,
    "rope_theta": 5000000, "rotary_dim": 64, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
    "scoring_func": "sigmoid", "shared_intermediate_size": 0, "tie_word_embeddings": False, "use_mtp": True,
    "use_qk_norm": True, "use_routing_bias": True, "vocab_size": 200064, "torch_dtype": "bfloat16",
}


def test_inspect_minimax_m2_real_size(tmp_path):
    """Published (MiniMax-M2 model card): 230B total, 10B active. We count 228.7B and 11.03B, of which
    9.80B are not the embedding and LM-head matrices (the card's "10B"); recounted by hand below."""
    s = inspect_config_only(tmp_path, MINIMAX_M2)
    assert (s["family"], s["layers"], s["moe_layers"], s["experts_per_layer"], s["top_k"], s["shared_experts"]) == \
        ("minimax_m2", 62, 62, 256, 8, 0)
    H, expert, embeddings = 3072, 3 * 3072 * 1536, 2 * 200064 * 3072
    attention = H * 48 * 128 + 2 * H * 8 * 128 + 48 * 128 * H + 48 * 128 + 8 * 128  # q, k, v, o, q_norm, k_norm
    total = embeddings + 62 * (attention + 2 * H + 256 * H + 256 + 256 * expert) + H
    assert s["total_params"] == total and s["active_params"] == total - 62 * (256 - 8) * expert
    assert round(s["total_params"] / 10e9) == 23 and round((s["active_params"] - embeddings) / 1e9) == 10
    assert s["kv_bytes_per_token"] == 62 * 2 * 8 * 128 * 2
