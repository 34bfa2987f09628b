"""Qwen3.5-MoE (Qwen3.5-35B-A3B, -122B-A10B, -397B-A17B), text model: Qwen3-Next's hybrid stack
(`hybrid.py`) with four separate DeltaNet input projections, every layer MoE, top-k always renormalised.

What differs from Qwen3-Next (`qwen3_next.py`), as transformers' Qwen3_5Moe* classes have it:
- the DeltaNet projections are `in_proj_qkv` ([q | k | v], ungrouped), `in_proj_z`, `in_proj_b`,
  `in_proj_a` instead of the per-key-head grouped `in_proj_qkvz` / `in_proj_ba`;
- there are no dense layers (no `mlp_only_layers` / `decoder_sparse_step`) and no `norm_topk_prob`;
- the hub config is multimodal (`model_type: qwen3_5_moe`, the text model's keys under `text_config`,
  a vision tower under `vision_config`); transformers saves a text-only model as `qwen3_5_moe_text`
  with flat keys. Both are read.
- RoPE is "interleaved M-RoPE" (`mrope_section`): separate temporal/height/width positions for image
  tokens. For text every token's three positions are equal and M-RoPE is plain 1-D RoPE on the first
  `partial_rotary_factor` of each head, which is what runs here; images and video are not supported.

Checkpoint names (this family's whole name map): the text model's tensors under
`model.language_model.` in multimodal checkpoints, `model.` in text-only ones (`lm_head.weight`
either way), then Qwen3-Next's names with the four projections above. The vision tower
(`model.visual.*`) and the multi-token-prediction head (`mtp.*`) are not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe_local.loading.checkpoint_map import CheckpointMap
from moe_local.models.base import text_model_config
from moe_local.models.qwen3_next import Qwen3Next, Qwen3NextArgs

TEXT_ONLY_MAP = CheckpointMap(ignored=(r".*\.rotary_emb\.", r"mtp\."))
# multimodal checkpoints: the text model under model.language_model. (lm_head.weight stays top-level)
MULTIMODAL_MAP = CheckpointMap(experts="model.language_model.layers.{layer}.mlp.experts",
                               renames=(("model.", "model.language_model."),),
                               ignored=(r".*\.rotary_emb\.", r"mtp\.", r"model\.visual\."))


@dataclass
class Qwen35MoeArgs(Qwen3NextArgs):
    intermediate_size: int = 0  # no dense MLPs: the text config has no such key
    multimodal: bool = False  # set from the config's layout (text_config present), not a config key
    required: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")

    @classmethod
    def from_config(cls, cfg: dict) -> "Qwen35MoeArgs":
        merged = text_model_config(cfg)
        if merged is None:
            return super().from_config({k: v for k, v in cfg.items() if k != "multimodal"})
        args = super().from_config(merged)
        args.multimodal = True
        return args

    def __post_init_args__(self) -> None:
        super().__post_init_args__()
        self.norm_topk_prob = True  # Qwen3.5's router always renormalises
        self.mlp_only_layers, self.decoder_sparse_step = [], 1  # ... and every layer is MoE

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0


class Qwen35Moe(Qwen3Next):
    family = "qwen3_5_moe"
    Args = Qwen35MoeArgs
    fused_projections: ClassVar[bool] = False  # in_proj_qkv / in_proj_z / in_proj_b / in_proj_a

    @property
    def checkpoint_map(self) -> CheckpointMap:  # type: ignore[override]
        return MULTIMODAL_MAP if self.args.multimodal else TEXT_ONLY_MAP

    def notes(self) -> list[str]:
        if not self.args.multimodal:
            return []
        return ["the vision tower (model.visual.*) is not loaded: text only"]
