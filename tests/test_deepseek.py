"""DeepSeek-V2 / V3 parity with transformers: MLA (compressed cache, absorbed decode), YaRN, routing,
shared experts, dense first layers, MTP layers ignored, FP8 block-quantized checkpoints, and the
perplexity of the shared trained model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_local.loading.checkpoint import Checkpoint
from moe_local.models.deepseek import BiasedRouter
from moe_local.models.layers import RopeConfig, Router, rope_inv_freq
from moe_local.models.mla import MLAttention
from moe_local.models.weights import unread_tensors
from moe_local.models.routing import deepseek_v2_topk, deepseek_v3_noaux_tc
from moe_local.runtime.loader import load_model
from tests.tiny import (PROMPT_LEN, VOCAB, YARN, assert_matches_reference, reference_logits, save_tiny,
                        v2_lite_config, v3_config)
def prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- parity
def test_v2_lite_yarn_greedy_matches_transformers(tmp_path):
    ref = save_tiny(v2_lite_config(), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    a = lm.model.args
    assert a.q_lora_rank is None and a.moe_layers == [1, 2]
    attn = lm.model.model.layers[0].self_attn
    assert isinstance(attn, MLAttention) and hasattr(attn, "q_proj") and not hasattr(attn, "q_a_proj")
    # YaRN tables and the mscale softmax correction are transformers' own
    inv_freq, factor = rope_inv_freq(a.rope_config(), 256)
    assert torch.equal(inv_freq, ref.model.rotary_emb.inv_freq)
    assert factor == pytest.approx(ref.model.rotary_emb.attention_scaling)
    ref_attn = ref.model.layers[0].self_attn
    assert attn.scale == pytest.approx(ref_attn.scaling, rel=1e-12) and attn.scale != 24**-0.5


def test_v2_group_limited_greedy_matches_transformers(tmp_path):
    cfg = v2_lite_config(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
                         routed_scaling_factor=1.5, q_lora_rank=24)
    ref = save_tiny(cfg, tmp_path)
    assert_matches_reference(tmp_path, ref, vocab=VOCAB)


@pytest.mark.parametrize("interleave", [True, False])
def test_v3_matches_transformers(tmp_path, interleave):
    ref = save_tiny(v3_config(rope_interleave=interleave), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    routers = lm.model.routers()
    assert sorted(routers) == [1, 2] and all(isinstance(r, BiasedRouter) for r in routers.values())
    bias = routers[1].e_score_correction_bias
    assert torch.equal(bias, ref.model.layers[1].mlp.gate.e_score_correction_bias) and bias.abs().sum() > 0


def test_v3_correction_bias_changes_selection(tmp_path):
    """The random bias must matter for the parity test to prove anything: without it, other experts win."""
    ref = save_tiny(v3_config(), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="float32")
    ids = prompt()
    captured: dict[int, torch.Tensor] = {}
    lm.model.setup_cache(PROMPT_LEN)
    lm.model(ids, 0, on_layer=lambda i, x: captured.setdefault(i, x.clone()))
    layer = lm.model.model.layers[1]
    with torch.inference_mode():
        h = captured[1] + layer.self_attn(layer.input_layernorm(captured[1]), 0, lm.model.rope(0, PROMPT_LEN))
        h = layer.post_attention_layernorm(h)
    gate = layer.mlp.gate
    saved = gate.e_score_correction_bias.detach().clone()
    with torch.inference_mode():
        with_bias = gate(h)[0].sort(dim=-1).values
        gate.e_score_correction_bias.zero_()
        without = gate(h)[0].sort(dim=-1).values
    assert not torch.equal(with_bias, without)
    # ...and ignoring it breaks parity, so the parity test does check that the bias is used
    lm.model.setup_cache(PROMPT_LEN)
    assert (lm.model(ids, 0) - reference_logits(ref, ids)).abs().max() > 1e-3
    with torch.inference_mode():
        gate.e_score_correction_bias.copy_(saved)
    lm.model.setup_cache(PROMPT_LEN)
    assert (lm.model(ids, 0) - reference_logits(ref, ids)).abs().max() <= 1e-4


def test_v3_absorbed_and_expanded_attention_agree(tmp_path):
    """Weight absorption (the decode path) gives the reference logits when forced on a whole prompt too."""
    ref = save_tiny(v3_config(), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="float32")
    ids = prompt()
    expected = reference_logits(ref, ids)
    for absorb in (True, False):
        for layer in lm.model.model.layers:
            layer.self_attn.absorb = absorb
        lm.model.setup_cache(PROMPT_LEN)
        assert (lm.model(ids, 0) - expected).abs().max() <= 1e-4, absorb


def test_mla_cache_holds_only_latent_and_rope_key(tmp_path):
    cfg = v3_config()
    save_tiny(cfg, tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="float32")
    lm.model.setup_cache(40)
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 40 here; 512 + 64 = 576 at V3 sizes
    for layer in lm.model.model.layers:
        assert layer.self_attn.cache.values_per_token == per_token
        assert tuple(layer.self_attn.cache.buf.shape) == (40, per_token)
    assert lm.model.kv_cache_bytes() == cfg.num_hidden_layers * 40 * per_token * 4


# --------------------------------------------------------------------------- rope
@pytest.mark.parametrize("params", [
    dict(YARN),
    {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5},  # attention factor != 1
    {**YARN, "mscale": None, "mscale_all_dim": None, "factor": 40.0, "beta_fast": 16},
    {**YARN, "truncate": False},
    {**YARN, "attention_factor": 0.9},
])
def test_yarn_tables_match_transformers(params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {k: v for k, v in params.items() if v is not None}
    cfg = v3_config(rope_parameters=dict(params), max_position_embeddings=512)
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    ours = RopeConfig.from_config(cfg.to_dict(), cfg.qk_rope_head_dim)
    inv, factor = rope_inv_freq(ours, 64)  # the cache length must not matter
    assert torch.equal(inv, inv_ref)
    assert factor == pytest.approx(factor_ref, rel=1e-12)


def test_old_style_rope_scaling_is_read():
    """Hub config.json files of V2/V3 still say rope_scaling {type: yarn} with rope_theta at top level."""
    old = {"rope_theta": 10000.0, "max_position_embeddings": 163840,
           "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}}
    new = {"max_position_embeddings": 163840,
           "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40,
                               "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0}}
    assert RopeConfig.from_config(old, 64) == RopeConfig.from_config(new, 64)


# --------------------------------------------------------------------------- routing rules
def test_routing_rules_match_transformers_routers():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(0)
    x = torch.randn(512, 64)
    cases = [
        (DeepseekV3TopkRouter(v3_config(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=6)),
         deepseek_v3_noaux_tc(6, 8, 3, True, 2.5), True),
        (DeepseekV3TopkRouter(v3_config(norm_topk_prob=False)),
         deepseek_v3_noaux_tc(4, 4, 2, False, 2.5), True),
        (DeepseekV2TopkRouter(v2_lite_config(routed_scaling_factor=2.0)),
         deepseek_v2_topk(2, "greedy", None, None, 2.0), False),
        (DeepseekV2TopkRouter(v2_lite_config(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                             num_experts_per_tok=3)),
         deepseek_v2_topk(3, "group_limited_greedy", 4, 2, 1.0), False),
    ]
    for ref, rule, biased in cases:
        with torch.no_grad():
            ref.weight.normal_()
            if biased:
                ref.e_score_correction_bias.copy_(torch.rand_like(ref.e_score_correction_bias) * 0.5)
        E, H = ref.weight.shape
        ours = BiasedRouter(H, E, rule) if biased else Router(H, E, rule)
        with torch.no_grad():
            ours.weight.copy_(ref.weight)
            if biased:
                ours.e_score_correction_bias.copy_(ref.e_score_correction_bias)
            _, ref_w, ref_ids = ref(x)
        ids, w = ours(x)
        o_ref, o = ref_ids.sort(-1), ids.sort(-1)
        assert torch.equal(o.values, o_ref.values)
        assert torch.allclose(w.gather(1, o.indices), ref_w.gather(1, o_ref.indices), atol=1e-6)


# --------------------------------------------------------------------------- checkpoint quirks
def test_v3_mtp_layer_tensors_are_ignored(tmp_path):
    """V3 checkpoints hold layer num_hidden_layers (the MTP module); we neither build nor read it."""
    cfg = v3_config(num_nextn_predict_layers=1)
    ref = save_tiny(cfg, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    mtp = f"model.layers.{cfg.num_hidden_layers}"
    extra = {f"{mtp}.eh_proj.weight": torch.randn(64, 128), f"{mtp}.enorm.weight": torch.ones(64),
             f"{mtp}.self_attn.q_a_proj.weight": torch.randn(48, 64),
             f"{mtp}.mlp.gate.weight": torch.randn(16, 64),
             f"{mtp}.mlp.experts.0.gate_proj.weight": torch.randn(32, 64),
             f"{mtp}.shared_head.head.weight": torch.randn(VOCAB, 64)}
    save_file({**tensors, **extra}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert len(lm.model.model.layers) == cfg.num_hidden_layers
    cmap, n = lm.model.checkpoint_map, cfg.num_hidden_layers
    assert all(cmap.is_ignored(name, n) for name in extra)
    assert not cmap.is_ignored("model.layers.2.self_attn.q_a_proj.weight", n)
    assert unread_tensors(lm.model, Checkpoint(tmp_path)) == []  # everything else is read
    assert cfg.num_hidden_layers not in lm.source.moe_layers


def to_fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's hub format: e4m3 weights, one float32 scale per 128x128 block (partial edge blocks)."""
    rows, cols = w.shape
    R, C = math.ceil(rows / block), math.ceil(cols / block)
    scale = torch.empty(R, C)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(R):
        for j in range(C):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequant_by_hand(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[sl] = q[sl].float() * scale[i, j]
    return out


def is_fp8_linear(name: str, t: torch.Tensor) -> bool:
    """What DeepSeek-V3 ships in FP8: attention and MLP/expert projections; not norms, router, embeddings."""
    return t.ndim == 2 and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


def test_v3_fp8_block_checkpoint_is_dequantized(tmp_path):
    # intermediate_size 200 spans two 128-wide blocks with a partial one, in rows (gate/up) and cols (down)
    cfg = v3_config(intermediate_size=200)
    ref = save_tiny(cfg, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    dequant: dict[str, torch.Tensor] = {}
    for name in [n for n, t in tensors.items() if is_fp8_linear(n, t)]:
        q, s = to_fp8_blocks(tensors[name])
        dequant[name] = dequant_by_hand(q, s)
        tensors[name], tensors[name + "_scale_inv"] = q, s
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv" in tensors
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in tensors
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (1, 2)
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)
    assert any(".experts.3.up_proj.weight_scale_inv" in n for n in tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})

    ckpt = Checkpoint(tmp_path)
    original = dict(ref.state_dict())
    for name, expected in dequant.items():
        got = ckpt.get(name)
        assert got.dtype == torch.float32 and torch.equal(got, expected), name
        if name in original:  # within e4m3's 3-bit mantissa (plus subnormal floor) of the fp32 weights
            w = original[name]
            assert torch.allclose(got, w, rtol=2**-4, atol=w.abs().max().item() / 448 * 2**-6), name

    # the reference, given the same dequantized weights, must agree with us to float32 precision
    inter = cfg.moe_intermediate_size
    with torch.no_grad():
        for name, w in dequant.items():
            if name in original:
                ref.get_parameter(name).copy_(w)
                continue
            parts = name.split(".")  # model.layers.{l}.mlp.experts.{e}.{proj}.weight
            exp, e, proj = ref.model.layers[int(parts[2])].mlp.experts, int(parts[5]), parts[6]
            if proj == "gate_proj":
                exp.gate_up_proj[e, :inter] = w
            elif proj == "up_proj":
                exp.gate_up_proj[e, inter:] = w
            else:
                exp.down_proj[e] = w
    assert_matches_reference(tmp_path, ref, vocab=VOCAB)


# --------------------------------------------------------------------------- shared trained model
def test_shared_model_perplexity_matches_transformers(shared_model):
    """Whole 2048-token window in one pass, float32 on CPU, both sides scored the same way."""
    from transformers import AutoModelForCausalLM

    ids = torch.from_numpy(np.load(shared_model / "eval_ids.npy")[:2048].astype(np.int64))
    lm = load_model(shared_model, device="cpu", dtype="float32")
    cache_per_token = lm.model.args.kv_lora_rank + lm.model.args.qk_rope_head_dim
    lm.model.setup_cache(ids.shape[0])
    ours = torch.nn.functional.cross_entropy(lm.model(ids, 0)[:-1], ids[1:]).item()
    assert lm.model.kv_cache_bytes() == lm.model.args.num_hidden_layers * ids.shape[0] * cache_per_token * 4
    del lm
    ref = AutoModelForCausalLM.from_pretrained(shared_model, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        theirs = torch.nn.functional.cross_entropy(ref(ids[None]).logits[0, :-1].float(), ids[1:]).item()
    ppl_ours, ppl_ref = math.exp(ours), math.exp(theirs)
    print(f"perplexity on {ids.shape[0]} tokens: moe-local {ppl_ours:.4f}, transformers {ppl_ref:.4f}")
    assert abs(ppl_ours / ppl_ref - 1) < 0.005


# --------------------------------------------------------------------------- config handling
def test_layer_plan_and_config_errors():
    from moe_local.errors import ConfigError
    from moe_local.models import build_model

    cfg = v2_lite_config(num_hidden_layers=6, first_k_dense_replace=1).to_dict()
    assert build_model(cfg).args.moe_layers == [1, 2, 3, 4, 5]
    # moe_layer_freq as in DeepSeek's own code (every released checkpoint uses 1)
    model = build_model({**cfg, "moe_layer_freq": 2})
    assert model.args.moe_layers == [2, 4]
    assert hasattr(model.model.layers[3].mlp, "gate_proj") and hasattr(model.model.layers[4].mlp, "shared_experts")
    assert model.model.layers[4].mlp.shared_experts.gate_proj.weight.shape == (2 * 32, 64)
    for bad, words in (({"topk_method": "noaux_tc"}, "topk_method"),
                       ({"topk_method": "group_limited_greedy", "n_group": None}, "n_group"),
                       ({"mlp_bias": True}, "mlp_bias"),
                       ({"n_group": 3}, "multiple")):
        with pytest.raises(ConfigError, match=words) as info:
            build_model({**cfg, **bad})
        assert "\n" not in str(info.value)
    v3 = v3_config().to_dict()
    with pytest.raises(ConfigError, match="topk_group"):
        build_model({**v3, "topk_group": 8})
