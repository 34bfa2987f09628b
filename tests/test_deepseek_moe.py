"""DeepSeekMoE 16B parity (`model_type: deepseek`, hub remote code, not in transformers).

The oracle is assembled from transformers' parts with the same math as the public
deepseek-ai/deepseek-moe-16b-base `modeling_deepseek.py` (see tests/deepseek_moe_reference.py):
transformers' LlamaForCausalLM (DeepSeekMoE's attention, norms, dense MLP and RoPE are Llama's, the
remote code says "Copied from ... LlamaAttention") with every MoE layer's MLP replaced by
transformers' Qwen3-MoE softmax top-k router and experts plus a Llama MLP as the shared experts.
Checked: logits and greedy tokens, every option that changes the math (norm_topk_prob,
moe_layer_freq, first_k_dense_replace, attention_bias, GQA, linear RoPE scaling, no shared expert),
both expert layouts, an INT4 pack under a tight tiered budget, config errors, `inspect` at 16B."""

from __future__ import annotations

import pytest
import torch

from moe_local.errors import ConfigError
from moe_local.models import build_model
from moe_local.runtime.loader import load_model
from tests.family_checks import check_pack_tiered_matches_resident, inspect_config_only
from tests.tiny import (PROMPT_LEN, VOCAB, assert_matches_reference, deepseek_moe_config, fuse_experts,
                        reference_logits, save_tiny)

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread on a shared box (conftest)


def prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- parity
def test_deepseek_moe_matches_the_reference(tmp_path):
    ref = save_tiny(deepseek_moe_config(), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    m = lm.model
    assert (m.family, m.args.moe_layers, m.args.head_dim) == ("deepseek", [1, 2], 16)
    assert m.model.layers[1].mlp.shared_experts.gate_proj.weight.shape == (2 * 32, 64)
    assert m.model.layers[0].mlp.gate_proj.weight.shape == (96, 64)  # the dense first layer


def test_deepseek_moe_options_match_the_reference(tmp_path):
    """Every option that changes the math, in one variant: renormalised top-k, an MoE layer every 2nd layer
    from layer 0, biases on q/k/v/o, grouped KV heads, linear RoPE scaling, one shared expert."""
    cfg = deepseek_moe_config(norm_topk_prob=True, moe_layer_freq=2, first_k_dense_replace=0, num_hidden_layers=4,
                              attention_bias=True, num_key_value_heads=2, n_shared_experts=1,
                              rope_scaling={"type": "linear", "factor": 2.0})
    ref = save_tiny(cfg, tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    attn = lm.model.model.layers[0].self_attn
    assert lm.model.args.moe_layers == [0, 2] and attn.o_proj.bias is not None and attn.k_proj.weight.shape == (32, 64)


def test_renormalising_changes_the_output(tmp_path):
    """The reference really honours norm_topk_prob (false on the hub): the same weights with it on differ."""
    ref = save_tiny(deepseek_moe_config(), tmp_path / "off")
    on = save_tiny(deepseek_moe_config(norm_topk_prob=True), tmp_path / "on")
    ids = prompt()
    assert (reference_logits(ref, ids) - reference_logits(on, ids)).abs().max() > 1e-3


def test_without_shared_experts_matches_the_reference(tmp_path):
    """n_shared_experts null (the remote code's default): no shared MLP at all; all layers routed."""
    ref = save_tiny(deepseek_moe_config(n_shared_experts=None, first_k_dense_replace=0), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert not hasattr(lm.model.model.layers[0].mlp, "shared_experts") and lm.model.args.moe_layers == [0, 1, 2]


def test_deepseek_moe_fused_expert_layout_matches_the_reference(tmp_path):
    ref = save_tiny(deepseek_moe_config(first_k_dense_replace=0), tmp_path)
    fuse_experts(tmp_path, "model.layers.{}.mlp.experts", ("gate_proj", "up_proj", "down_proj"), 3, 16)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert all(lm.source.is_fused(layer) for layer in range(3))


def test_bfloat16_run_is_finite(tmp_path):
    save_tiny(deepseek_moe_config(), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="bfloat16")
    lm.model.setup_cache(PROMPT_LEN)
    assert torch.isfinite(lm.model(prompt(), 0)).all()


# --------------------------------------------------------------------------- packs, tiers, look-ahead
def test_int4_pack_tiered_budget_gives_resident_tokens(tmp_path):
    save_tiny(deepseek_moe_config(first_k_dense_replace=0, num_hidden_layers=2), tmp_path / "ckpt")
    check_pack_tiered_matches_resident(tmp_path / "ckpt", tmp_path, prompt().tolist())


# --------------------------------------------------------------------------- config handling
def test_config_errors_name_the_key():
    cfg = deepseek_moe_config().to_dict()
    for bad, words in (({"scoring_func": "sigmoid"}, "scoring_func"), ({"moe_layer_freq": 0}, "moe_layer_freq"),
                       ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
                       ({"hidden_size": 66}, "num_attention_heads")):
        with pytest.raises(ConfigError, match=words) as info:
            build_model({**cfg, **bad})
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- inspect at real sizes
DEEPSEEK_MOE_16B = {  # deepseek-ai/deepseek-moe-16b-base config.json (auto_map left out)
    "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 10944, "max_position_embeddings": 4096, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 28, "num_key_value_heads": 16, "pretraining_tp": 1,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 102400,
}


def test_inspect_deepseek_moe_16b_real_size(tmp_path):
    """Published (DeepSeekMoE paper / model card): 16.4B total, 2.8B activated. We count 16.376B and 2.829B."""
    s = inspect_config_only(tmp_path, DEEPSEEK_MOE_16B)
    assert (s["family"], s["layers"], s["moe_layers"], s["experts_per_layer"], s["top_k"], s["shared_experts"]) == \
        ("deepseek", 28, 27, 64, 6, 2)
    H, expert = 2048, 3 * 2048 * 1408
    total = 2 * 102400 * H + 28 * (4 * H * H + 2 * H) + 3 * H * 10944 + 27 * (64 * H + 2 * expert + 64 * expert) + H
    assert s["total_params"] == total and s["active_params"] == total - 27 * (64 - 6) * expert
    assert round(s["total_params"] / 1e8) == 164 and round(s["active_params"] / 1e8) == 28
    assert s["kv_bytes_per_token"] == 28 * 2 * 2048 * 2
