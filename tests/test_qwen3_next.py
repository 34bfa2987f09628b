"""Qwen3-Next and Qwen3.5-MoE parity with transformers: the hybrid Gated DeltaNet / gated-attention
stack (chunked prefill over several chunks, one-token recurrent decode, prefill continued from a
cached state), the recurrent state in our cache and the honest prefix reuse it forces on the
generator, shared expert with sigmoid gate, dense layers, the multimodal hub layout of Qwen3.5,
both expert layouts, INT4 packs under a tight tiered budget, and `inspect` at the real sizes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moe_local.cli.app import app
from moe_local.errors import ConfigError
from moe_local.models import build_model
from moe_local.models.hybrid import GatedDeltaNet
from moe_local.runtime.generate import GenerateOptions, Generator
from moe_local.runtime.loader import load_model
from moe_local.runtime.sampling import SamplingOptions
pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread on a shared box (conftest)
from tests.family_checks import check_pack_tiered_matches_resident, cli, inspect_config_only, runner
from tests.tiny import (VOCAB, assert_matches_reference, fuse_experts, qwen3_5_moe_config, qwen3_5_moe_text_config,
                        qwen3_next_config, reference_greedy, reference_logits, save_tiny)

next_config, q35_text_config = qwen3_next_config, qwen3_5_moe_text_config


def ids_of(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def forward_in_parts(lm, ids: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Logits of `ids` fed as consecutive forwards split at `cuts` (each continues the cached state)."""
    lm.model.setup_cache(ids.shape[0])
    bounds = [0, *cuts, ids.shape[0]]
    return torch.cat([lm.model(ids[a:b], a) for a, b in zip(bounds, bounds[1:])])


# --------------------------------------------------------------------------- parity
def test_qwen3_next_matches_transformers(tmp_path):
    ref = save_tiny(next_config(), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    mixers = [type(layer.mixer).__name__ for layer in lm.model.model.layers]
    assert mixers == ["GatedDeltaNet"] * 3 + ["GatedAttention"]
    assert lm.model.args.moe_layers == [0, 2, 3] and lm.source.moe_layers == [0, 2, 3]


def test_qwen3_next_options_match_transformers(tmp_path):
    """Every math-changing option in one variant: attention biases, un-normalised top-k, half-head RoPE,
    full attention every 2nd layer, one value head per key head, conv kernel 3, decoder_sparse_step 2."""
    cfg = next_config(attention_bias=True, norm_topk_prob=False, partial_rotary_factor=0.5, full_attention_interval=2,
                      linear_num_key_heads=4, linear_conv_kernel_dim=3, decoder_sparse_step=2, mlp_only_layers=[])
    ref = save_tiny(cfg, tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    a = lm.model.args
    assert a.layer_types == ["linear_attention", "full_attention"] * 2 and a.moe_layers == [1, 3]
    assert a.rotary_dim == 8 and lm.model.model.layers[1].mixer.o_proj.bias is not None


def test_qwen3_next_fused_expert_layout_matches_transformers(tmp_path):
    ref = save_tiny(next_config(mlp_only_layers=[]), tmp_path)
    fuse_experts(tmp_path, "model.layers.{}.mlp.experts", ("gate_proj", "up_proj", "down_proj"), 4, 8)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert all(lm.source.is_fused(layer) for layer in range(4))


def test_qwen3_5_moe_text_matches_transformers(tmp_path):
    ref = save_tiny(q35_text_config(), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert lm.model.family == "qwen3_5_moe" and lm.model.args.moe_layers == [0, 1, 2, 3]
    assert hasattr(lm.model.model.layers[0].mixer, "in_proj_qkv") and lm.model.notes() == []


def test_qwen3_5_moe_hub_layout_matches_transformers(tmp_path):
    """config.json with text_config + vision_config, the text model under model.language_model., a vision
    tower that is skipped (said once at load), routed experts fused as on the hub."""
    ref = save_tiny(qwen3_5_moe_config(), tmp_path)
    names = load_file(tmp_path / "model.safetensors").keys()
    assert any(n.startswith("model.visual.") for n in names) and "model.language_model.norm.weight" in names
    fuse_experts(tmp_path, "model.language_model.layers.{}.mlp.experts", ("gate_proj", "up_proj", "down_proj"), 4, 8)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert lm.model.args.multimodal and lm.source.is_fused(0)
    cmap = lm.model.checkpoint_map
    assert cmap.is_ignored("model.visual.blocks.0.attn.qkv.weight", 4) and cmap.is_ignored("mtp.fc.weight", 4)
    assert not cmap.is_ignored("model.language_model.layers.0.linear_attn.A_log", 4)
    assert cmap.checkpoint_name("model.norm.weight") == "model.language_model.norm.weight"
    s = json.loads(cli("inspect", tmp_path, "--json"))
    text_params = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("model.visual."))
    assert (s["family"], s["moe_layers"], s["shared_experts"], s["total_params"]) == ("qwen3_5_moe", 4, 1, text_params)
    out = runner.invoke(app, ["generate", str(tmp_path), "--prompt-ids", "1,2,3", "-n", "2", "--temperature", "0"])
    assert out.exit_code == 0, out.output
    assert out.stderr.count("note: the vision tower (model.visual.*) is not loaded: text only") == 1


# --------------------------------------------------------------------------- chunks, recurrence, the state
@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe"])
def test_long_prompts_and_continued_prefill_match_transformers(tmp_path, family):
    """150 tokens = three 64-token chunks (the last one partial) in one prefill; the same cut into
    forwards of 100, 49 and 1 tokens (chunked prefill continued from the cached conv and delta state,
    then one recurrent step); and one token at a time (the recurrence throughout)."""
    ref = save_tiny(next_config() if family == "qwen3_next" else q35_text_config(), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="float32")
    ids = ids_of(150, seed=3)
    expected = reference_logits(ref, ids)
    for cuts in ([], [100, 149], list(range(1, 40))):
        got = forward_in_parts(lm, ids[:40] if len(cuts) > 2 else ids, cuts)
        want = expected[:got.shape[0]]
        assert (got - want).abs().max() <= 1e-4, cuts
    # the state matters: dropping it between the parts breaks the match
    lm.model.setup_cache(150)
    lm.model(ids[:100], 0)
    for layer in lm.model.model.layers:
        if isinstance(layer.mixer, GatedDeltaNet):
            layer.mixer.cache.recurrent.zero_()
    assert (lm.model(ids[100:], 100) - expected[100:]).abs().max() > 1e-2


def test_recurrent_state_lives_in_the_cache(tmp_path):
    """Conv inputs (K-1 per channel) and the float32 delta state per linear layer, whatever the context
    length or model dtype; `inspect` reports it apart from the per-token KV of the full-attention layers."""
    cfg = next_config()
    save_tiny(cfg, tmp_path)
    conv_dim = 2 * 2 * 8 + 4 * 12  # q, k: 2 key heads x 8; v: 4 value heads x 12
    per_layer = {torch.float32: 3 * conv_dim * 4 + 4 * 8 * 12 * 4, torch.bfloat16: 3 * conv_dim * 2 + 4 * 8 * 12 * 4}
    kv = 2 * 2 * 16  # k and v, 2 kv heads x head_dim 16, one full-attention layer
    for dtype in (torch.float32, torch.bfloat16):
        lm = load_model(tmp_path, device="cpu", dtype=str(dtype).removeprefix("torch."))
        for n in (10, 100):
            lm.model.setup_cache(n)
            assert lm.model.kv_cache_bytes() == 3 * per_layer[dtype] + n * kv * dtype.itemsize
        lm.model(ids_of(5), 0)
        state = lm.model.model.layers[0].mixer.cache
        assert state.recurrent.dtype == torch.float32 and state.pos == 5 and state.recurrent.abs().sum() > 0
    s = json.loads(cli("inspect", tmp_path, "--json", "--dtype", "bfloat16"))
    assert s["state_bytes"] == 3 * per_layer[torch.bfloat16] and s["kv_bytes_per_token"] == kv * 2
    assert "recurrent state (fixed)" in cli("inspect", tmp_path)


def test_chat_prefix_reuse_continues_the_state_only_from_its_end(tmp_path):
    """The next turn of a chat starts with everything cached: it continues from the state. A prompt that
    diverges inside the cached tokens (or repeats them) cannot: the state saw other tokens and cannot be
    rewound, so it is recomputed from position 0 and says so (0 cached). Tokens always equal transformers'."""
    ref = save_tiny(next_config(), tmp_path)
    gen = Generator(load_model(tmp_path, device="cpu", dtype="float32"), eos_ids=[])
    opts = GenerateOptions(sampling=SamplingOptions(temperature=0), max_tokens=6)
    gen.reserve(64)  # as a chat does: one cache for the whole conversation (growing it would forget it)
    first = ids_of(12, seed=5).tolist()
    r1 = gen.generate(first, opts)
    second = first + r1.tokens + ids_of(7, seed=6).tolist()
    r2 = gen.generate(second, opts)
    assert r2.timings.cached_tokens == len(first) + len(r1.tokens) - 1  # the last sampled token never ran
    assert r2.tokens == reference_greedy(ref, torch.tensor(second), 6)
    diverged = first[:8] + ids_of(9, seed=7).tolist()
    r3 = gen.generate(diverged, opts)
    assert r3.timings.cached_tokens == 0 and r3.tokens == reference_greedy(ref, torch.tensor(diverged), 6)
    r4 = gen.generate(diverged, opts)  # the same prompt again: all of it is cached, yet one token must run
    assert r4.timings.cached_tokens == 0 and r4.tokens == r3.tokens


def test_an_interrupted_forward_is_not_resumed(tmp_path):
    """A forward stopped half way (Ctrl-C) leaves some layers' states advanced: nothing may continue from there."""
    save_tiny(next_config(), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="float32")
    lm.model.setup_cache(32)
    lm.model(ids_of(10), 0)
    assert lm.model.can_resume(10) and not lm.model.can_resume(9)
    third = lm.model.model.layers[2].mixer

    def boom(*args):
        raise KeyboardInterrupt
    third.forward = boom
    with pytest.raises(KeyboardInterrupt):
        lm.model(ids_of(4, seed=2), 10)
    del third.forward
    assert not lm.model.can_resume(10) and not lm.model.can_resume(14)
    with pytest.raises(ValueError, match="cannot continue"):
        lm.model(ids_of(4, seed=2), 10)


def test_bfloat16_run_keeps_the_state_in_float32(tmp_path):
    save_tiny(q35_text_config(), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="bfloat16")
    lm.model.setup_cache(80)
    logits = torch.cat([lm.model(ids_of(70), 0), lm.model(ids_of(1, seed=9), 70)])
    assert torch.isfinite(logits).all() and lm.model.model.layers[0].mixer.cache.recurrent.dtype == torch.float32


# --------------------------------------------------------------------------- packs, tiers, look-ahead
@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe"])
def test_int4_pack_tiered_budget_gives_resident_tokens(tmp_path, family):
    cfg = next_config(mlp_only_layers=[]) if family == "qwen3_next" else q35_text_config()
    save_tiny(cfg, tmp_path / "ckpt")
    check_pack_tiered_matches_resident(tmp_path / "ckpt", tmp_path, ids_of(16).tolist())


def test_lookahead_rescales_by_the_zero_centred_norm_gain(tmp_path):
    """The look-ahead maps layer L's router input to layer j's by the ratio of their norms' multipliers;
    these norms multiply by 1 + weight, not by weight (which is near 0 in trained checkpoints)."""
    save_tiny(next_config(mlp_only_layers=[]), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="float32")
    layers = lm.model.model.layers
    ratio = lm.model.lookahead(depth=1)._scale(0, "mlp", 2)
    gain = [1 + layers[i].post_attention_layernorm.weight.float() for i in (0, 2)]
    assert torch.allclose(ratio, gain[1] / gain[0])


# --------------------------------------------------------------------------- inspect at real sizes
QWEN3_NEXT_80B_A3B = {  # Qwen/Qwen3-Next-80B-A3B-Instruct config.json
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2,
    "head_dim": 256, "hidden_act": "silu", "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "rope_theta": 10000000, "partial_rotary_factor": 0.25, "attention_bias": False,
    "full_attention_interval": 4, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts": 512,
    "num_experts_per_tok": 10, "norm_topk_prob": True, "torch_dtype": "bfloat16",
}
QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B config.json
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "rope_theta": 1000000.0, "attention_bias": False, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "use_sliding_window": False, "sliding_window": None, "torch_dtype": "bfloat16",
}


def _inspect_config(tmp_path, config: dict) -> dict:
    """`moe-local inspect` on a folder holding only config.json: the model is built on the meta device,
    every figure comes from its parameter shapes; no weight exists or is allocated."""
    return inspect_config_only(tmp_path, config)  # memory figures for a bf16 run


def test_inspect_qwen3_next_80b_a3b_real_size(tmp_path):
    """Published (model card of Qwen/Qwen3-Next-80B-A3B-Instruct, "Model Overview"): 80B parameters in
    total, 79B non-embedding, 3B activated. Our total is 79.67B; our active count includes the embedding
    and LM-head matrices (2 x 0.31B, as Qwen's own 3.3B for Qwen3-30B-A3B does): 3.87B, of which 3.25B are
    non-embedding -- the card's "3B" (to one significant figure, like "80B")."""
    s = _inspect_config(tmp_path, QWEN3_NEXT_80B_A3B)
    embeddings = 2 * 151936 * 2048
    assert (s["family"], s["layers"], s["moe_layers"], s["experts_per_layer"], s["top_k"]) == ("qwen3_next", 48, 48, 512, 10)
    assert round(s["total_params"] / 1e9) == 80 and round((s["total_params"] - embeddings) / 1e9) == 79
    assert round((s["active_params"] - embeddings) / 1e9) == 3
    # the same count by hand from the card's architecture (another project got 79,674,391,296 too)
    H, expert = 2048, 3 * 2048 * 512
    deltanet = H * (2 * 2048 + 2 * 4096) + H * 2 * 32 + 8192 * 4 + 2 * 32 + 128 + 4096 * H  # in_proj_qkvz/ba, conv, dt/A, norm, out
    attention = H * 2 * 4096 + 2 * H * 512 + 4096 * H + 2 * 256  # gated q_proj, k/v, o_proj, q/k norms
    moe = 512 * H + expert + H  # router, shared expert, its gate
    total = embeddings + 36 * deltanet + 12 * attention + 48 * (moe + 512 * expert + 2 * H) + H
    assert s["total_params"] == total == 79_674_391_296
    assert s["active_params"] == total - 48 * (512 - 10) * expert
    # 36 DeltaNet layers: float32 state [32, 128, 128] + 3 conv inputs of 8192 channels; 12 attention layers' KV
    assert s["state_bytes"] == 36 * (32 * 128 * 128 * 4 + 3 * 8192 * 2)
    assert s["kv_bytes_per_token"] == 12 * 2 * 2 * 256 * 2


def test_inspect_qwen3_30b_a3b_real_size(tmp_path):
    """Published (model card of Qwen/Qwen3-30B-A3B, "Model Overview"): 30.5B in total, 3.3B activated,
    29.9B non-embedding -- cut to one decimal, not rounded: we count 30.53B, 3.353B and 29.91B."""
    s = _inspect_config(tmp_path, QWEN3_30B_A3B)
    assert (s["family"], s["moe_layers"], s["experts_per_layer"], s["top_k"]) == ("qwen3_moe", 48, 128, 8)
    assert int(s["total_params"] / 1e8) == 305 and int(s["active_params"] / 1e8) == 33
    assert int((s["total_params"] - 2 * 151936 * 2048) / 1e8) == 299
    assert s["state_bytes"] == 0


# --------------------------------------------------------------------------- config handling
def test_config_errors_name_the_key():
    cfg = next_config().to_dict()
    for bad, words in (({"layer_types": ["linear_attention"] * 3}, "layer_types"),
                       ({"layer_types": ["linear_attention"] * 3 + ["sliding_attention"]}, "layer_types"),
                       ({"linear_num_value_heads": 3}, "linear_num_value_heads"),
                       ({"partial_rotary_factor": 2.0, "rope_parameters": {"rope_type": "default"}}, "partial_rotary")):
        with pytest.raises(ConfigError, match=words) as info:
            build_model({**cfg, **bad})
        assert "\n" not in str(info.value)
    # configs written before layer_types existed get transformers' rule
    old = {k: v for k, v in cfg.items() if k != "layer_types"}
    assert build_model({**old, "full_attention_interval": 2}).args.layer_types == ["linear_attention", "full_attention"] * 2
