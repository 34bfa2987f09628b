"""DeepSeek-V3.2 (-Exp): DeepSeek-V3 with DeepSeek Sparse Attention.

Everything but attention is DeepSeek-V3 (`deepseek.py`): noaux_tc routing with the selection-only
correction bias, shared experts, dense first layers, the MTP layer skipped, FP8 checkpoints
dequantized on load. Attention is MLA with a lightning indexer (`dsa.py`) that keeps each query's
`index_topk` best keys; its keys are cached next to MLA's latent.

Checkpoint names (all of this family's name knowledge): V3's, plus
`model.layers.{l}.self_attn.indexer.{wq_b,wk,weights_proj}.weight` and `indexer.k_norm.{weight,bias}`.
Differences from V3's config handling, as transformers' DeepseekV32Config has them: `q_lora_rank`
is required (the indexer's queries read the query latent), RoPE is always interleaved (no
`rope_interleave` key), and `mlp_layer_types` ("dense" / "sparse" per layer), when present, decides
which layers are MoE instead of `first_k_dense_replace`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moe_local.errors import ConfigError
from moe_local.models.deepseek import DeepseekV3, DeepseekV3Args
from moe_local.models.dsa import IndexedMLAttention, IndexerOptions


@dataclass
class DeepseekV32Args(DeepseekV3Args):
    # transformers' DeepseekV32Config defaults
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 64
    mlp_layer_types: list[str] | None = None

    def __post_init_args__(self) -> None:
        super().__post_init_args__()
        if self.q_lora_rank is None:
            raise ConfigError("config.json: deepseek_v32 needs q_lora_rank (its indexer reads the query latent)")
        if not 0 < self.qk_rope_head_dim <= self.index_head_dim:
            raise ConfigError(f"config.json: index_head_dim={self.index_head_dim} must hold the "
                              f"qk_rope_head_dim={self.qk_rope_head_dim} rotated dims")
        if self.index_topk < 1 or self.index_n_heads < 1:
            raise ConfigError("config.json: index_topk and index_n_heads must be positive")
        if self.mlp_layer_types is not None:
            bad = [t for t in self.mlp_layer_types if t not in ("dense", "sparse")]
            if len(self.mlp_layer_types) != self.num_hidden_layers or bad:
                raise ConfigError(f"config.json: mlp_layer_types must list 'dense' or 'sparse' for each of the "
                                  f"{self.num_hidden_layers} layers")

    def is_moe_layer(self, layer: int) -> bool:
        if self.mlp_layer_types is not None:
            return self.num_experts > 0 and self.mlp_layer_types[layer] == "sparse"
        return super().is_moe_layer(layer)

    def indexer_options(self) -> IndexerOptions:
        return IndexerOptions(hidden=self.hidden_size, q_lora_rank=self.q_lora_rank, heads=self.index_n_heads,
                              head_dim=self.index_head_dim, rope_dim=self.qk_rope_head_dim, topk=self.index_topk)


class DeepseekV32(DeepseekV3):
    family = "deepseek_v32"
    Args = DeepseekV32Args
    # V3's map; the routing bias and the indexer's per-head weights stay float32, as the reference keeps them
    checkpoint_map = dataclasses.replace(DeepseekV3.checkpoint_map,
                                         keep_fp32=("e_score_correction_bias", "indexer.weights_proj.weight"))

    def make_attention(self) -> IndexedMLAttention:
        a = self.args
        return IndexedMLAttention(a.mla_options(interleaved=True, rope_fp32=False), a.indexer_options())
