"""Helpers the tests share: tiny random checkpoints built with transformers (the test oracle), one
tiny config per family, comparisons against the reference, and the one-line-error check."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moe_local.runtime.loader import LoadedModel, load_model

PROMPT_LEN = 16
GREEDY_TOKENS = 24
VOCAB = 256


def save_tiny(config, path: Path, seed: int = 0):
    """Random-weight model from `config`, fp32, eager attention, zero-initialised buffers randomised.

    Returns the transformers model (the reference) after saving it to `path` with save_pretrained.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if hasattr(config, "save_reference"):  # a family transformers lacks brings its own oracle (DeepSeekMoE)
        return config.save_reference(path, seed)
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    # a multimodal config (Qwen3.5-MoE's hub layout) is saved whole, vision tower included
    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "e_score_correction_bias" in name:
                tensor.copy_(torch.rand_like(tensor) * 0.5)  # non-zero: selection must use it
            elif tensor.is_floating_point() and name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor))  # norms start at 1: make them count
            elif name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias", "self_attn.sinks")):
                tensor.copy_(torch.randn_like(tensor) * 0.5)  # gpt-oss: zero / tiny at init, make them count
    model.eval()
    model.save_pretrained(path)
    fix = HUB_LAYOUT.get(getattr(config, "hub_model_type", config.model_type))
    if fix is not None:
        fix(path)
    return model


def _kimi_k25_hub_names(path: Path) -> None:
    """transformers' save_pretrained reverses its Kimi-K2.5 load renames everywhere, so the text model comes
    out as `language_model.model.blocks.N` (the vision tower's `blocks` -> `layers` undone on it too); the
    hub checkpoint (and what vLLM / SGLang read) names it `language_model.model.layers.N`. Restore that."""
    tensors = load_file(path / "model.safetensors")
    fixed = {n.replace("language_model.model.blocks.", "language_model.model.layers.")
             .replace("model.mm_projector.", "mm_projector."): t for n, t in tensors.items()}
    save_file(fixed, path / "model.safetensors", metadata={"format": "pt"})


def _kimi_k2_model_type(path: Path) -> None:
    """Kimi-K2's text-only checkpoints are DeepSeek-V3's, saved by transformers as such; the hub config says kimi_k2."""
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2"}))


# model_type -> rewrite of what save_pretrained wrote into the layout of the family's hub checkpoints
HUB_LAYOUT = {"kimi_k25": _kimi_k25_hub_names, "kimi_k2": _kimi_k2_model_type}


def reference_logits(ref, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref(ids[None]).logits[0].float()


def reference_greedy(ref, ids: torch.Tensor, n: int = GREEDY_TOKENS) -> list[int]:
    with torch.no_grad():
        # An explicit mask: otherwise transformers treats prompt ids equal to pad_token_id as padding.
        out = ref.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[0]:].tolist()


def our_greedy(lm: LoadedModel, ids: torch.Tensor, n: int = GREEDY_TOKENS) -> list[int]:
    """Prefill then one token at a time through our KV cache."""
    model = lm.model
    model.setup_cache(ids.shape[0] + n)
    logits = model(ids, 0, last_only=True)
    out = []
    pos = ids.shape[0]
    for _ in range(n):
        tok = int(logits[-1].argmax())
        out.append(tok)
        logits = model(torch.tensor([tok]), pos)
        pos += 1
    return out


def assert_matches_reference(path: Path, ref, vocab: int, atol: float = 1e-4, seed: int = 1) -> LoadedModel:
    """Logits within atol on a 16-token prompt and 24 identical greedy tokens."""
    lm = load_model(path, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (PROMPT_LEN,), generator=g)
    lm.model.setup_cache(PROMPT_LEN)
    ours = lm.model(ids, 0)
    ref_logits = reference_logits(ref, ids)
    diff = (ours - ref_logits).abs().max().item()
    assert diff <= atol, f"max |logit diff| {diff:.3g} > {atol}"
    assert our_greedy(lm, ids) == reference_greedy(ref, ids)
    return lm


# --------------------------------------------------------------------------- tiny configs, one per family
def mixtral_config(**kw):
    from transformers import MixtralConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                max_position_embeddings=128, tie_word_embeddings=False)
    base.update(kw)
    return MixtralConfig(**base)


def qwen2_moe_config(**kw):
    from transformers import Qwen2MoeConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, moe_intermediate_size=32,
                shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2,
                max_position_embeddings=128, tie_word_embeddings=False)
    base.update(kw)
    return Qwen2MoeConfig(**base)


def qwen3_moe_config(**kw):
    from transformers import Qwen3MoeConfig

    # head_dim 24 != hidden/heads = 16: the explicit head_dim must be honoured
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=8,
                num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                max_position_embeddings=128, tie_word_embeddings=False)
    base.update(kw)
    return Qwen3MoeConfig(**base)


def olmoe_config(**kw):
    from transformers import OlmoeConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                clip_qkv=0.4, max_position_embeddings=128, tie_word_embeddings=False,
                pad_token_id=None, eos_token_id=None)
    base.update(kw)
    return OlmoeConfig(**base)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
        "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}


def v2_lite_config(**kw):
    """DeepSeek-V2-Lite shape in miniature: no q_lora_rank, softmax greedy, 2 shared experts, YaRN."""
    from transformers import DeepseekV2Config

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, topk_method="greedy",
                routed_scaling_factor=1.0, max_position_embeddings=256, rope_parameters=dict(YARN))
    base.update(kw)
    return DeepseekV2Config(**base)


def v3_config(**kw):
    """DeepSeek-V3 shape in miniature: q_lora_rank, noaux_tc with 4 groups (keep 2), 1 shared expert."""
    from transformers import DeepseekV3Config

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
                num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
                routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=256)
    base.update(kw)
    return DeepseekV3Config(**base)


def v32_config(**kw):
    """DeepSeek-V3.2 in miniature; index_topk 4 < a 16-token prompt, so the indexer drops keys."""
    from transformers import DeepseekV32Config

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                index_topk=4, index_head_dim=16, index_n_heads=8, max_position_embeddings=256)
    base.update(kw)
    return DeepseekV32Config(**base)


HYBRID = dict(vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_key_head_dim=8,
              linear_value_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=8,
              num_experts_per_tok=2, max_position_embeddings=256)


def qwen3_next_config(**kw):
    """Qwen3-Next in miniature: layers 0-2 Gated DeltaNet, 3 gated attention (full_attention_interval 4);
    layer 1 a dense MLP; 2 value heads per key head; RoPE on a quarter of each head."""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(**{**HYBRID, "intermediate_size": 96, "mlp_only_layers": [1], **kw})


def qwen3_5_moe_text_config(**kw):
    """Qwen3.5-MoE's text model as transformers saves it alone (model_type qwen3_5_moe_text)."""
    from transformers.models.qwen3_5_moe import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(**{**HYBRID, **kw})


def qwen3_5_moe_config(**kw):
    """Qwen3.5-MoE's hub layout: text_config + a tiny vision_config (saved with its vision tower)."""
    from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig

    return Qwen3_5MoeConfig(text_config={**HYBRID, **kw}, vision_config=dict(depth=1, hidden_size=32, intermediate_size=32,
                                                                             num_heads=2, out_hidden_size=64))


def glm4_moe_config(**kw):
    """GLM-4.5 in miniature: RoPE on half of each 24-dim head, noaux_tc with 4 groups (keep 2), 1 shared
    expert, one dense first layer."""
    from transformers import Glm4MoeConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=24, n_routed_experts=16, num_experts_per_tok=4,
                n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                max_position_embeddings=256)
    base.update(kw)
    return Glm4MoeConfig(**base)


def kimi_k25_config(**kw):
    """Kimi-K2.5's hub layout in miniature: a DeepSeek-V3 text_config (one group, as Kimi-K2 ships; kimi_k2
    as its model_type, as the hub says) beside a one-block vision tower; the LM head not tied."""
    from transformers.models.kimi_k25 import Kimi_K25Config

    text = dict(model_type="kimi_k2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4,
                n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.827,
                norm_topk_prob=True, max_position_embeddings=256)
    text.update(kw.pop("text", {}))
    vision = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=32, num_attention_heads=2, pos_emb_height=4,
                  pos_emb_width=4)
    return Kimi_K25Config(**{"text_config": text, "vision_config": vision, "projection_hidden_size": 32,
                             "tie_word_embeddings": False, **kw})


def minimax_m2_config(**kw):
    """MiniMax-M2 in miniature: RoPE on 12 of each 24-dim head (the hub's legacy `rotary_dim` key), every
    layer MoE, 8 experts top-2."""
    from transformers import MiniMaxM2Config

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, rotary_dim=12, num_local_experts=8, num_experts_per_tok=2,
                max_position_embeddings=256, bos_token_id=None, eos_token_id=None)
    base.update(kw)
    return MiniMaxM2Config(**base)


def deepseek_moe_config(**kw):
    """DeepSeekMoE 16B in miniature (its oracle: tests/deepseek_moe_reference.py): MHA, 16 fine-grained experts
    top-4 un-normalised, 2 shared experts, one dense first layer."""
    from tests.deepseek_moe_reference import DeepseekMoeTinyConfig

    return DeepseekMoeTinyConfig(**kw)


def gpt_oss_config(**kw):
    """gpt-oss in miniature: alternating sliding (window 5, inside the 16-token prompt) and full
    attention, YaRN, 8 experts top-2; H=64 and I=96: multiples of MXFP4's 32-wide blocks, and no two
    expert dims coincide (the saved gate_up is transposed: [E, H, 2I])."""
    from transformers import GptOssConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=5,
                max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                 "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32})
    base.update(kw)
    return GptOssConfig(**base)


def kimi_k2_config(**kw):
    """Kimi-K2 (text only) in miniature: DeepSeek-V3 with one group, saved with model_type kimi_k2."""
    cfg = v3_config(**{"n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827, **kw})
    cfg.hub_model_type = "kimi_k2"  # save_tiny writes it into config.json (transformers has no kimi_k2)
    return cfg


def v4_config(**kw):
    """DeepSeek-V4 in miniature: layers sliding / CSA / HCA / CSA (compress rates 4 and 8, so a 16-token
    prompt already has compressed entries), a window of 8, index_topk 2 (the indexer drops entries),
    two hash-routed layers, 2 hyper-connection streams."""
    from transformers import DeepseekV4Config

    base = dict(vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=1, head_dim=32, q_lora_rank=48, qk_rope_head_dim=8, n_routed_experts=8,
                num_experts_per_tok=2, n_shared_experts=1, sliding_window=8, o_groups=2, o_lora_rank=16,
                index_n_heads=4, index_head_dim=16, index_topk=2,
                compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                             "compressed_sparse_attention"],
                mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], hc_mult=2, hc_sinkhorn_iters=5,
                max_position_embeddings=256)
    base.update(kw)
    return DeepseekV4Config(**base)


# model_type -> a tiny config of that family (tests/test_families.py checks every family has one)
TINY_CONFIGS = {
    "mixtral": mixtral_config,
    "qwen2_moe": qwen2_moe_config,
    "qwen3_moe": qwen3_moe_config,
    "olmoe": olmoe_config,
    "deepseek_v2": v2_lite_config,
    "deepseek_v3": v3_config,
    "deepseek_v32": v32_config,
    "qwen3_next": qwen3_next_config,
    "qwen3_5_moe": qwen3_5_moe_config,
    "qwen3_5_moe_text": qwen3_5_moe_text_config,
    "glm4_moe": glm4_moe_config,
    "kimi_k25": kimi_k25_config,
    "kimi_k2": kimi_k2_config,
    "minimax_m2": minimax_m2_config,
    "deepseek": deepseek_moe_config,  # DeepSeekMoE 16B
    "gpt_oss": gpt_oss_config,
    "deepseek_v4": v4_config,
}


def fuse_experts(path, prefix_fmt: str, names: tuple[str, str, str], layers: int, experts: int) -> None:
    """Rewrite a per-expert checkpoint into the fused 3-D layout (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    tensors = load_file(path / "model.safetensors")
    for layer in range(layers):
        p = prefix_fmt.format(layer)
        g, u, d = ([tensors.pop(f"{p}.{e}.{n}.weight") for e in range(experts)] for n in names)
        tensors[f"{p}.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b in zip(g, u)])
        tensors[f"{p}.down_proj"] = torch.stack(d)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


# --------------------------------------------------------------------------- CLI errors
def assert_one_line_error(output: str, exit_code: int, *needles: str) -> str:
    assert exit_code != 0
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------- gpt-oss's hub layout
MXFP4_CONFIG = {"quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"]}


def to_mxfp4_checkpoint(path, out, bf16: bool = False) -> None:
    """Rewrite a save_pretrained gpt-oss checkpoint (float experts, gate_up [E, H, 2I], down
    [E, I, H]) into the hub's MXFP4 layout, as openai/gpt-oss-* ship it: `<proj>_blocks` uint8
    [E, out, in/32, 16] (two E2M1 codes per byte, low nibble first) and `<proj>_scales` uint8
    [E, out, in/32] (e8m0 exponents, bias 127), plus `quantization_config.quant_method = mxfp4` in
    config.json. The codes come from our `mxfp4` scheme; transformers' own dequantizer then reads
    them as the reference (integrations/mxfp4.py), so the layout is checked against it. `bf16`:
    every other tensor (attention, router, biases, embeddings) in bfloat16, as on the hub."""
    import json
    from pathlib import Path

    from moe_local.formats.schemes import get_scheme

    path, out = Path(path), Path(out)
    scheme = get_scheme("mxfp4")
    tensors = load_file(path / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = tensors.pop(name).transpose(1, 2)  # [E, out, in]
        packed = [scheme.quantize(w[e].float()) for e in range(w.shape[0])]
        E, out_f, in_f = w.shape
        tensors[f"{name}_blocks"] = torch.stack([p["codes"] for p in packed]).reshape(E, out_f, in_f // 32, 16)
        tensors[f"{name}_scales"] = torch.stack([p["scales"] for p in packed])
    if bf16:
        tensors = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = MXFP4_CONFIG
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
