"""Qwen2-MoE, Qwen3-MoE and OLMoE parity with transformers (logits and greedy tokens), including
dense/MoE layer mixes, the gated shared expert, sliding windows, clip_qkv and the fused expert layout."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.errors import ConfigError
from moe_local.models import build_model
from tests.tiny import (VOCAB, assert_matches_reference, fuse_experts, olmoe_config, qwen2_moe_config,
                        qwen3_moe_config, save_tiny)


def _clip_is_active(ref, threshold: float) -> bool:
    """True when some normed q/k projection exceeds clip_qkv, i.e. the clamp changes the result."""
    q = ref.model.layers[0].self_attn.q_norm(ref.model.layers[0].self_attn.q_proj(
        ref.model.layers[0].input_layernorm(ref.model.embed_tokens.weight)))
    return bool((q.abs() > threshold).any())


def test_qwen2_moe_shared_expert_and_dense_layers_match_transformers(tmp_path):
    ref = save_tiny(qwen2_moe_config(), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert lm.model.args.moe_layers == [1]  # decoder_sparse_step=2: only layer 1 is sparse
    assert lm.source.moe_layers == [1]
    assert set(lm.model.routers()) == {1}


def test_qwen2_moe_sliding_window_and_topk_norm_match_transformers(tmp_path):
    cfg = qwen2_moe_config(use_sliding_window=True, sliding_window=5, max_window_layers=2, norm_topk_prob=True,
                           decoder_sparse_step=1, mlp_only_layers=[2])
    ref = save_tiny(cfg, tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    windows = [layer.self_attn.o.sliding_window for layer in lm.model.model.layers]
    assert windows == [5, None, None]  # even layers below max_window_layers only, as transformers decides
    assert lm.model.args.moe_layers == [0, 1]


def test_qwen2_moe_without_layer_types_in_config_uses_the_same_rule(tmp_path):
    save_tiny(qwen2_moe_config(use_sliding_window=True, sliding_window=5, max_window_layers=3), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    expected = cfg.pop("layer_types")
    model = build_model(cfg)
    assert model.args.layer_types == expected == ["sliding_attention", "full_attention", "sliding_attention"]


def test_qwen3_moe_matches_transformers(tmp_path):
    ref = save_tiny(qwen3_moe_config(), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert lm.model.args.head_dim == 24
    assert lm.model.args.moe_layers == [0, 2]  # mlp_only_layers=[1]


def test_qwen3_moe_attention_bias_and_sliding_window_match_transformers(tmp_path):
    ref = save_tiny(qwen3_moe_config(attention_bias=True, use_sliding_window=True, sliding_window=6,
                                     norm_topk_prob=False, mlp_only_layers=[]), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert all(layer.self_attn.o_proj.bias is not None for layer in lm.model.model.layers)


def test_olmoe_clip_qkv_matches_transformers(tmp_path):
    ref = save_tiny(olmoe_config(), tmp_path)
    with torch.no_grad():
        assert _clip_is_active(ref, 0.4), "test config too tame: clip_qkv never bites"
    assert_matches_reference(tmp_path, ref, vocab=VOCAB)


def test_olmoe_fused_expert_layout_matches_transformers(tmp_path):
    ref = save_tiny(olmoe_config(norm_topk_prob=True), tmp_path)
    fuse_experts(tmp_path, "model.layers.{}.mlp.experts", ("gate_proj", "up_proj", "down_proj"), 2, 8)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert lm.source.is_fused(0)


def test_qwen2_moe_fused_expert_layout_matches_transformers(tmp_path):
    ref = save_tiny(qwen2_moe_config(), tmp_path)
    # only layer 1 has routed experts; the fused rewrite must leave the shared expert alone
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    p = "model.layers.1.mlp.experts"
    g, u, d = ([tensors.pop(f"{p}.{e}.{n}.weight") for e in range(8)] for n in ("gate_proj", "up_proj", "down_proj"))
    tensors[f"{p}.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b in zip(g, u)])
    tensors[f"{p}.down_proj"] = torch.stack(d)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert lm.source.is_fused(1)


def test_olmoe_rejects_a_head_dim_its_norms_cannot_have(tmp_path):
    cfg = olmoe_config().to_dict()
    cfg["head_dim"] = 32
    with pytest.raises(ConfigError, match="head_dim"):
        build_model(cfg)


def test_bf16_routing_weights_are_cast_like_transformers(tmp_path):
    """Qwen/OLMoE scale expert outputs by bf16 routing weights (Mixtral keeps float32)."""
    save_tiny(olmoe_config(), tmp_path)
    model = build_model(json.loads((tmp_path / "config.json").read_text()))
    router = model.routers()[0]
    router.weight = torch.nn.Parameter(torch.randn(8, 64, dtype=torch.bfloat16))
    ids, weights = router(torch.randn(3, 64, dtype=torch.bfloat16))
    assert ids.shape == (3, 2) and weights.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_variants_equal_transformers_bitwise(dtype):
    """Our norms run one fused op (F.rms_norm) where the references run five: the results must be the
    same to the last bit (a tolerance would hide a different rounding order that could flip a token)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm, Qwen3NextRMSNormGated

    from moe_local.models.csa import Fp32RMSNorm
    from moe_local.models.hybrid import GatedRMSNorm, ZeroCenteredRMSNorm
    from moe_local.models.layers import RMSNorm

    gen = torch.Generator().manual_seed(0)
    pairs = [(RMSNorm, Qwen3MoeRMSNorm, dtype), (ZeroCenteredRMSNorm, Qwen3NextRMSNorm, dtype),
             (GatedRMSNorm, Qwen3NextRMSNormGated, dtype), (Fp32RMSNorm, DeepseekV4RMSNorm, torch.float32)]
    for ours_cls, ref_cls, weight_dtype in pairs:
        for shape in ((1, 2048), (7, 96), (3, 4, 128), (1, 32, 128)):
            d = shape[-1]
            ours, ref = ours_cls(d, 1e-6), ref_cls(d, eps=1e-6)
            weight = torch.randn(d, generator=gen).to(weight_dtype)
            with torch.no_grad():
                ours.weight.data, ref.weight.data = weight.clone(), weight.clone()
            x = (3 * torch.randn(shape, generator=gen)).to(dtype)
            gate = torch.randn(shape, generator=gen).to(dtype)
            with torch.inference_mode():
                args = (x, gate) if ours_cls is GatedRMSNorm else (x,)
                got, want = ours(*args), ref(*args)
            assert got.dtype == want.dtype and torch.equal(got, want), (ours_cls.__name__, shape)
