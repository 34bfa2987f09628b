"""Model families: one short file each, arranged from the blocks in `layers.py` and `base.py`.

`build_model(config)` picks the family by `model_type` and builds it on the meta device (no memory);
`load_weights` then fills it from a checkpoint, name for name, through the walk in `weights.py`.
"""

from __future__ import annotations

import importlib

import torch

from moe_local.errors import ConfigError
from moe_local.formats.schemes import PackedWeight
from moe_local.models.base import CausalLM, ModelArgs
from moe_local.models.weights import checkpoint_experts, held_dtype, weight_refs

# model_type -> "module:Class"; imported on demand so one family's import cost is not everyone's.
FAMILIES: dict[str, str] = {
    "mixtral": "moe_local.models.mixtral:Mixtral",
    "qwen2_moe": "moe_local.models.qwen2_moe:Qwen2Moe",
    "qwen3_moe": "moe_local.models.qwen3_moe:Qwen3Moe",
    "olmoe": "moe_local.models.olmoe:Olmoe",
    "deepseek_v2": "moe_local.models.deepseek:DeepseekV2",
    "deepseek_v3": "moe_local.models.deepseek:DeepseekV3",
    "deepseek_v32": "moe_local.models.deepseek_v32:DeepseekV32",
    "qwen3_next": "moe_local.models.qwen3_next:Qwen3Next",
    "qwen3_5_moe": "moe_local.models.qwen3_5_moe:Qwen35Moe",  # the hub's multimodal config (text model run)
    "qwen3_5_moe_text": "moe_local.models.qwen3_5_moe:Qwen35Moe",  # what transformers saves for the text model
    "glm4_moe": "moe_local.models.glm4_moe:Glm4Moe",
    "kimi_k25": "moe_local.models.kimi_k25:KimiK25",  # the text model of the multimodal checkpoint
    "kimi_k2": "moe_local.models.kimi_k25:KimiK2",  # Kimi-K2's text-only checkpoints (DeepSeek-V3 exactly)
    "minimax_m2": "moe_local.models.minimax_m2:MiniMaxM2",
    "deepseek": "moe_local.models.deepseek_moe:DeepseekMoe",  # DeepSeekMoE 16B (hub remote code)
    "gpt_oss": "moe_local.models.gpt_oss:GptOss",
    "deepseek_v4": "moe_local.models.deepseek_v4:DeepseekV4",
}


def family_class(model_type: str | None) -> type[CausalLM]:
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ConfigError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    module, cls = FAMILIES[model_type].split(":")
    return getattr(importlib.import_module(module), cls)


def build_model(config: dict) -> CausalLM:
    """Instantiate the family for `config` on the meta device (weights come later)."""
    cls = family_class(config.get("model_type"))
    args = cls.Args.from_config(config)
    with torch.device("meta"):
        model = cls(args)
    return model.eval()


def load_weights(model: CausalLM, ckpt, device: torch.device | str, dtype: torch.dtype,
                 progress=None) -> None:
    """Copy every non-expert parameter from the checkpoint (shape-checked), then drop meta tensors.

    Matrices stay at their storage dtype (`held_dtype`); a pack's quantized dense tensors stay packed
    (`PackedWeight`, from `ckpt.packed`) and replace the module's `weight` parameter, so they are
    computed from their packed bytes by `formats.compute.linear` (and gathered row-wise by the
    embedding). Routed experts are skipped: they belong to an ExpertProvider, never to the model.
    """
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedWeight] = {}
    get_packed = getattr(ckpt, "packed", None)  # a Pack has it; a Checkpoint holds no packed tensors
    for ref in weight_refs(model, ckpt):
        pw = get_packed(ref.name) if get_packed is not None and not ref.fp32 else None
        if pw is not None:
            packed[ref.param] = pw.to(device)
        else:
            tensor = ckpt.get(ref.name, shape=ref.shape)
            state[ref.param] = tensor.to(device=device, dtype=held_dtype(tensor.dim(), tensor.dtype, dtype, ref.fp32))
        if progress is not None:
            progress(1)
    emb = "model.embed_tokens.weight"
    if "lm_head.weight" not in state and "lm_head.weight" not in packed:
        (packed if emb in packed else state)["lm_head.weight"] = packed.get(emb, state.get(emb))
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) != set(packed):
        raise RuntimeError(f"load_weights: parameters left unfilled {sorted(set(result.missing_keys) - set(packed))}")
    for param, pw in packed.items():
        module_name, _, attr = param.rpartition(".")
        module = model.get_submodule(module_name)
        delattr(module, attr)  # the meta parameter: a packed weight is not an nn.Parameter
        setattr(module, attr, pw)
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.run_dtype = dtype


__all__ = ["FAMILIES", "CausalLM", "ModelArgs", "build_model", "checkpoint_experts", "family_class", "held_dtype", "load_weights",
           "weight_refs"]
