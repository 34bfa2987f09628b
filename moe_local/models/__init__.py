"""Model families: one short file each, arranged from the blocks in `layers.py` and `base.py`.

`build_model(config)` picks the family by `model_type` and builds it on the meta device (no memory);
`load_weights` then fills it from a checkpoint, name for name.
"""

from __future__ import annotations

import importlib

import torch

from moe_local.errors import CheckpointError, ConfigError
from moe_local.models.base import CausalLM, ModelArgs

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
}


def family_class(model_type: str | None) -> type[CausalLM]:
    if model_type not in FAMILIES:
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


def keeps_fp32(name: str, keep: tuple[str, ...]) -> bool:
    """Whether parameter `name` ends with one of `keep`, a model's `keep_fp32` entries: a last name
    component ("e_score_correction_bias") or a dotted suffix ("indexer.weights_proj.weight")."""
    return any(name == k or name.endswith("." + k) for k in keep)


def load_weights(model: CausalLM, ckpt, device: torch.device | str, dtype: torch.dtype,
                 progress=None) -> None:
    """Copy every non-expert parameter from the checkpoint (shape-checked), then drop meta tensors.

    Routed experts are skipped: they belong to an ExpertProvider, never to the model.
    """
    state: dict[str, torch.Tensor] = {}
    # e.g. DeepSeek-V3's routing bias, V3.2's indexer head weights: selection-critical
    keep_fp32 = getattr(model, "keep_fp32", ())
    for name, param in model.named_parameters():
        src = model.sanitize(name)
        if src not in ckpt:
            if name == "lm_head.weight" and model.args.tie_word_embeddings:
                continue
            raise CheckpointError(f"tensor {src!r} (needed by {model.family}) is missing", ckpt.root)
        tensor = ckpt.get(src, shape=tuple(param.shape))
        want = torch.float32 if keeps_fp32(name, keep_fp32) else dtype
        state[name] = tensor.to(device=device, dtype=want)
        if progress is not None:
            progress(1)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


__all__ = ["FAMILIES", "CausalLM", "ModelArgs", "build_model", "family_class", "keeps_fp32", "load_weights"]
