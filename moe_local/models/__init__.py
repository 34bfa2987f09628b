"""Model families: one short file each, arranged from the blocks in `layers.py` and `base.py`.

`build_model(config)` picks the family by `model_type` and builds it on the meta device (no memory);
`load_weights` then fills it from a checkpoint, name for name, through the walk in `weights.py`.
"""

from __future__ import annotations

import importlib

import torch

from moe_local.errors import ConfigError
from moe_local.models.base import CausalLM, ModelArgs
from moe_local.models.weights import checkpoint_experts, weight_refs

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
    "minimax_m2": "moe_local.models.minimax_m2:MiniMaxM2",
    "gpt_oss": "moe_local.models.gpt_oss:GptOss",
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

    Routed experts are skipped: they belong to an ExpertProvider, never to the model.
    """
    state: dict[str, torch.Tensor] = {}
    for ref in weight_refs(model, ckpt):
        tensor = ckpt.get(ref.name, shape=ref.shape)
        state[ref.param] = tensor.to(device=device, dtype=torch.float32 if ref.fp32 else dtype)
        if progress is not None:
            progress(1)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


__all__ = ["FAMILIES", "CausalLM", "ModelArgs", "build_model", "checkpoint_experts", "family_class", "load_weights",
           "weight_refs"]
