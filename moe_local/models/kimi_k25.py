"""Kimi-K2.5 (`kimi_k25`): the text model of Moonshot's multimodal checkpoint, which is DeepSeek-V3
(`deepseek.py`: MLA, noaux_tc routing with the correction bias, one shared expert, a dense first
layer; 384 experts, top-8, one group at Kimi-K2 sizes).

What is Kimi's own, as transformers' Kimi_K25* classes have it:
- config.json is multimodal: `model_type: kimi_k25`, the text model's keys under `text_config`
  (its own `model_type` says `kimi_k2` or `deepseek_v3`), a vision tower under `vision_config`;
  the top-level `tie_word_embeddings` decides tying (transformers' default: tied; the hub config
  says false).
- Checkpoint names (this family's whole name map): the text model under `language_model.model.`
  and its head as `language_model.lm_head.weight` (the hub layout), then DeepSeek-V3's names. The
  vision tower (`vision_tower.*`) and the projector (`mm_projector.*`) are not loaded, said once.
  Multi-token-prediction layers past `num_hidden_layers`, if any, are skipped as in V3.

The text-only Kimi-K2 checkpoints (K2-Base / -Instruct / -Thinking: `model_type: kimi_k2`, the hub's
remote code, V3's layout under `model.`) are DeepSeek-V3 exactly: `KimiK2` below, V3's map. Their FP8
(K2-Instruct) and INT4 (K2-Thinking) weights are dequantized on load like K2.5's.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_local.loading.checkpoint_map import CheckpointMap
from moe_local.models.base import text_model_config
from moe_local.models.deepseek import DeepseekV3, DeepseekV3Args

VISION = (r"vision_tower\.", r"mm_projector\.", r"model\.vision_tower\.", r"model\.mm_projector\.")


@dataclass
class KimiK25Args(DeepseekV3Args):
    tie_word_embeddings: bool = True  # Kimi_K25Config's default (the top-level key)

    @classmethod
    def from_config(cls, cfg: dict) -> "KimiK25Args":
        merged = text_model_config(cfg)
        if merged is None:  # a bare text config is read as it is: the same model without the wrapper
            return super().from_config(cfg)
        return super().from_config({**merged, "tie_word_embeddings": cfg.get("tie_word_embeddings", True)})


class KimiK25(DeepseekV3):
    family = "kimi_k25"
    Args = KimiK25Args
    checkpoint_map = CheckpointMap(experts="language_model.model.layers.{layer}.mlp.experts",
                                   renames=(("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
                                   keep_fp32=("e_score_correction_bias",), ignore_extra_layers=True,
                                   ignored=(r".*\.rotary_emb\.", *VISION))

    def notes(self) -> list[str]:
        return ["the vision tower (vision_tower.*, mm_projector.*) is not loaded: text only"]


class KimiK2(DeepseekV3):
    family = "kimi_k2"
