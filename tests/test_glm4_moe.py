"""GLM-4.5 / 4.6 / 4.7 MoE parity with transformers (`glm4_moe`): partial rotary, per-head qk-norm,
attention biases, noaux_tc routing with groups and the correction bias, shared experts, dense first
layers; the multi-token-prediction layer of hub checkpoints skipped; both expert layouts; an INT4 pack
under a tight tiered budget; `inspect` at the sizes of GLM-4.5-Air and GLM-4.5."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_local.errors import ConfigError
from moe_local.loading.checkpoint import Checkpoint
from moe_local.models import build_model
from moe_local.models.weights import unread_tensors
from moe_local.runtime.loader import load_model
from tests.family_checks import check_pack_tiered_matches_resident, inspect_config_only
from tests.tiny import PROMPT_LEN, VOCAB, YARN, assert_matches_reference, glm4_moe_config, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread on a shared box (conftest)


def prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- parity
def test_glm4_moe_matches_transformers(tmp_path):
    ref = save_tiny(glm4_moe_config(), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    a = lm.model.args
    assert a.moe_layers == [1, 2] and a.rotary_dim == 12 and lm.model.rope.cos.shape[-1] == 12  # half of 24
    assert lm.model.model.layers[1].mlp.shared_experts.gate_proj.weight.shape == (32, 64)


def test_glm4_moe_options_match_transformers(tmp_path):
    """The math-changing options in one variant: qk-norm, q/k/v biases, un-normalised top-k, 2 shared
    experts, no dense layer, a quarter-head YaRN rotary, other scaling, 8 groups keeping 3."""
    rope = {**YARN, "partial_rotary_factor": 0.25}
    cfg = glm4_moe_config(use_qk_norm=True, attention_bias=True, norm_topk_prob=False, n_shared_experts=2,
                          first_k_dense_replace=0, rope_parameters=rope, routed_scaling_factor=1.5, n_group=8,
                          topk_group=3, num_experts_per_tok=3)
    ref = save_tiny(cfg, tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    attn = lm.model.model.layers[0].self_attn
    assert lm.model.args.moe_layers == [0, 1, 2] and lm.model.args.rotary_dim == 6
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None and attn.q_norm.weight.shape == (24,)


def test_glm4_moe_hub_config_keys_match_transformers(tmp_path):
    """Hub configs put partial_rotary_factor and rope_theta at the top level (no rope_parameters), one
    group as GLM-4.5 ships; the same model must come out."""
    ref = save_tiny(glm4_moe_config(n_group=1, topk_group=1, use_qk_norm=True), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(partial_rotary_factor=rope["partial_rotary_factor"], rope_theta=rope["rope_theta"], rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert lm.model.args.rotary_dim == 12


def test_glm4_moe_fused_expert_layout_matches_transformers(tmp_path):
    ref = save_tiny(glm4_moe_config(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for layer in (1, 2):  # layer 0 is dense
        p = f"model.layers.{layer}.mlp.experts"
        g, u, d = ([tensors.pop(f"{p}.{e}.{n}.weight") for e in range(16)] for n in ("gate_proj", "up_proj", "down_proj"))
        tensors[f"{p}.gate_up_proj"] = torch.stack([torch.cat([x, y]) for x, y in zip(g, u)])
        tensors[f"{p}.down_proj"] = torch.stack(d)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert lm.source.is_fused(1) and lm.source.is_fused(2)


def test_the_mtp_layer_of_hub_checkpoints_is_not_read(tmp_path):
    """GLM-4.5 checkpoints store a multi-token-prediction layer as model.layers.{num_hidden_layers}.*:
    it is never run, so loading neither needs nor complains about it."""
    ref = save_tiny(glm4_moe_config(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.3.mlp.experts.0.gate_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ckpt = Checkpoint(tmp_path)
    assert unread_tensors(build_model(ckpt.config), ckpt) == []
    assert_matches_reference(tmp_path, ref, vocab=VOCAB)


def test_router_stays_float32_in_bfloat16(tmp_path):
    """As transformers keeps them (_keep_in_fp32_modules_strict): they decide which experts run."""
    save_tiny(glm4_moe_config(), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="bfloat16")
    gate = lm.model.model.layers[1].mlp.gate
    assert gate.e_score_correction_bias.dtype == torch.float32 and gate.weight.dtype == torch.float32
    assert lm.model.model.layers[1].mlp.shared_experts.gate_proj.weight.dtype == torch.bfloat16
    lm.model.setup_cache(PROMPT_LEN)
    assert torch.isfinite(lm.model(prompt(), 0)).all()


# --------------------------------------------------------------------------- packs, tiers, look-ahead
def test_int4_pack_tiered_budget_gives_resident_tokens(tmp_path):
    save_tiny(glm4_moe_config(first_k_dense_replace=0, num_hidden_layers=2), tmp_path / "ckpt")
    check_pack_tiered_matches_resident(tmp_path / "ckpt", tmp_path, prompt().tolist())


# --------------------------------------------------------------------------- config handling
def test_config_errors_name_the_key():
    cfg = glm4_moe_config().to_dict()
    for bad, words in (({"n_group": 3}, "n_group"), ({"topk_group": 5}, "topk_group"),
                       ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5}},
                        "partial_rotary_factor")):
        with pytest.raises(ConfigError, match=words) as info:
            build_model({**cfg, **bad})
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- inspect at real sizes
GLM_4_5_AIR = {  # zai-org/GLM-4.5-Air config.json
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True, "attention_dropout": 0.0,
    "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 10944,
    "max_position_embeddings": 131072, "moe_intermediate_size": 1408, "norm_topk_prob": True,
    "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128, "n_shared_experts": 1,
    "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1, "num_hidden_layers": 46,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_qk_norm": False, "vocab_size": 151552,
}
GLM_4_5 = {  # zai-org/GLM-4.5 config.json: what differs from the Air's
    **GLM_4_5_AIR, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "n_routed_experts": 160, "first_k_dense_replace": 3, "num_hidden_layers": 92, "use_qk_norm": True,
}


def test_inspect_glm_4_5_air_real_size(tmp_path):
    """Published (GLM-4.5 model card / report): 106B total, 12B active parameters. We count 106.85B in
    total (the MTP layer, never run, not counted) and 13.42B active, of which 12.18B are not the
    embedding and LM-head matrices."""
    s = inspect_config_only(tmp_path, GLM_4_5_AIR)
    embeddings = 2 * 151552 * 4096
    assert (s["family"], s["layers"], s["moe_layers"], s["experts_per_layer"], s["top_k"], s["shared_experts"]) == \
        ("glm4_moe", 46, 45, 128, 8, 1)
    assert int(s["total_params"] / 1e9) == 106 and round((s["active_params"] - embeddings) / 1e9) == 12
    H, expert = 4096, 3 * 4096 * 1408
    attention = H * (96 + 2 * 8) * 128 + (96 + 2 * 8) * 128 + 96 * 128 * H  # q/k/v (+ biases), o_proj
    moe = 128 * H + 128 + expert  # router, correction bias, shared expert
    total = embeddings + 46 * (attention + 2 * H) + 3 * H * 10944 + 45 * (moe + 128 * expert) + H
    assert s["total_params"] == total and s["active_params"] == total - 45 * 120 * expert
    assert s["kv_bytes_per_token"] == 46 * 2 * 8 * 128 * 2  # bf16 K and V of 8 KV heads


def test_inspect_glm_4_5_real_size(tmp_path):
    """Published: 355B total, 32B active. We count 352.8B (the MTP layer, about 4B, not counted: 356.8B
    with it) and 32.08B active without the embedding and LM-head matrices."""
    s = inspect_config_only(tmp_path, GLM_4_5)
    embeddings = 2 * 151552 * 5120
    assert (s["moe_layers"], s["experts_per_layer"], s["top_k"]) == (89, 160, 8)
    assert abs(s["total_params"] / 355e9 - 1) < 0.01 and round((s["active_params"] - embeddings) / 1e9) == 32
