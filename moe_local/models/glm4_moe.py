"""GLM-4.5 / 4.6 / 4.7 MoE (GLM-4.5-Air 106B-A12B, GLM-4.5 355B-A32B): GQA attention with partial
rotary, optional per-head qk-norm, DeepSeek-V3's `noaux_tc` routing, one shared expert, dense first layers.

As transformers' Glm4Moe* classes have it:
- RoPE covers the first `partial_rotary_factor` (0.5 by default) of each head, rotate_half style;
  the rest of the head passes through (`layers.apply_partial_rope`). The factor is read from
  `rope_parameters` (what transformers writes) or the top level (what the hub configs say).
- q/k/v projections carry a bias when `attention_bias` (o_proj never does); `use_qk_norm` adds an
  RMSNorm per head on q and k before RoPE.
- Routing: sigmoid scores, the float32 `e_score_correction_bias` added for selection only, groups
  (`n_group`, keep `topk_group`), weights renormalised if `norm_topk_prob`, times
  `routed_scaling_factor` (`routing.deepseek_v3_noaux_tc`, the DeepSeek-V3 router); the router's
  weight and bias stay float32 in any run dtype (transformers' `_keep_in_fp32_modules_strict`).
- Layers before `first_k_dense_replace` are a dense MLP; every later layer routes and adds
  `n_shared_experts` shared experts (one SwiGLU of n_shared_experts * moe_intermediate_size).

Checkpoint names (this family's whole name map): Hugging Face defaults (`model.layers.{l}.self_attn.*`,
`.mlp.gate.weight`, `.mlp.gate.e_score_correction_bias`, `.mlp.shared_experts.*`, routed experts under
`.mlp.experts`, per expert or fused). The multi-token-prediction layer stored after the last real one
(`model.layers.{num_hidden_layers}.*`) is never built, so it is declared ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe_local.errors import ConfigError
from moe_local.loading.checkpoint_map import CheckpointMap
from moe_local.models.base import CausalLM, DecoderLayer, ModelArgs
from moe_local.models.deepseek import BiasedRouter
from moe_local.models.layers import MLP, Attention, AttentionOptions, RopeConfig, SparseMoE
from moe_local.models.routing import deepseek_v3_noaux_tc


@dataclass
class Glm4MoeArgs(ModelArgs):
    # transformers' Glm4MoeConfig defaults, used only when config.json omits a key
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    use_qk_norm: bool = False
    partial_rotary_factor: float | None = None
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    aliases: ClassVar[dict[str, str]] = {"n_routed_experts": "num_experts", "num_local_experts": "num_experts"}

    def __post_init_args__(self) -> None:
        super().__post_init_args__()
        self.n_group, self.topk_group = self.n_group or 1, self.topk_group or 1
        if self.num_experts % self.n_group:
            raise ConfigError(f"config.json: n_routed_experts={self.num_experts} is not a multiple of "
                              f"n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"config.json: topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ConfigError(f"config.json: partial_rotary_factor gives {self.rotary_dim} rotary dims of "
                              f"head_dim={self.head_dim}; need an even number in 2..{self.head_dim}")

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_k_dense_replace

    @property
    def rotary_dim(self) -> int:
        """RoPE'd dims per head: rope_parameters' partial_rotary_factor, else the top-level key, else 0.5."""
        rope = self.raw.get("rope_parameters") or {}
        factor = rope.get("partial_rotary_factor", self.partial_rotary_factor)
        return int(self.head_dim * (0.5 if factor is None else factor))

    def rope_config(self) -> RopeConfig:
        return RopeConfig.from_config(self.raw, self.rotary_dim)


class Glm4Moe(CausalLM):
    family = "glm4_moe"
    Args = Glm4MoeArgs
    # the router's weight and bias stay float32 whatever the run dtype, as transformers keeps them
    checkpoint_map = CheckpointMap(keep_fp32=("e_score_correction_bias", "mlp.gate.weight"), ignore_extra_layers=True)

    def make_layer(self, i: int) -> DecoderLayer:
        a = self.args
        attn = Attention(AttentionOptions(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                          qkv_bias=a.attention_bias, qk_norm="head" if a.use_qk_norm else None,
                                          rms_eps=a.rms_norm_eps))
        if a.is_moe_layer(i):
            rule = deepseek_v3_noaux_tc(a.num_experts_per_tok, a.n_group, a.topk_group, bool(a.norm_topk_prob),
                                        a.routed_scaling_factor)
            shared = MLP(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts, a.hidden_act) \
                if a.n_shared_experts else None
            mlp = SparseMoE(i, BiasedRouter(a.hidden_size, a.num_experts, rule), self.experts, shared=shared)
        else:
            mlp = MLP(a.hidden_size, a.intermediate_size, a.hidden_act)
        return DecoderLayer(attn, mlp, a.hidden_size, a.rms_norm_eps)
