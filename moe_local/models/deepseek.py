"""DeepSeek-V2 / V2-Lite and DeepSeek-V3 / R1: MLA attention, shared + routed experts, dense first layers.

- Attention is Multi-head Latent Attention (`mla.py`) with a compressed KV cache; RoPE covers only
  qk_rope_head_dim dims, so the rope tables are built for that width (`rope_config`).
- Layers before `first_k_dense_replace` (and those off the `moe_layer_freq` grid) get a dense MLP;
  the others route to `n_routed_experts` and always add `n_shared_experts` shared experts (one
  SwiGLU of width n_shared_experts * moe_intermediate_size named `mlp.shared_experts`).
- V2 routes with softmax (`greedy` / `group_limited_greedy`); V3 with `noaux_tc` (sigmoid, group-limited,
  with a selection-only `e_score_correction_bias`). Both scale by routed_scaling_factor.
- V3 checkpoints carry `num_nextn_predict_layers` multi-token-prediction layers after the last real
  one (`model.layers.{num_hidden_layers}.*`); we never build them, so loading never asks for them
  (the checkpoint map declares them ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from moe_local.errors import ConfigError
from moe_local.loading.checkpoint_map import CheckpointMap
from moe_local.models.base import CausalLM, DecoderLayer, ModelArgs
from moe_local.models.layers import MLP, Rope, RopeConfig, Router, SparseMoE
from moe_local.models.mla import MLAOptions, MLAttention
from moe_local.models.routing import deepseek_v2_topk, deepseek_v3_noaux_tc


@dataclass
class DeepseekV2Args(ModelArgs):
    # defaults are transformers' DeepseekV2Config defaults, used only when config.json omits a key
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_shared_experts: int | None = 2
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str | None = "greedy"
    routed_scaling_factor: float = 1.0
    rope_interleave: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    num_nextn_predict_layers: int = 0
    aliases: ClassVar[dict[str, str]] = {"n_routed_experts": "num_experts"}
    positive: ClassVar[tuple[str, ...]] = ModelArgs.positive + (
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group",
        "routed_scaling_factor")

    def __post_init_args__(self) -> None:
        super().__post_init_args__()
        if self.n_group and self.topk_group and self.topk_group > self.n_group:
            raise ConfigError(f"config.json: topk_group={self.topk_group} is more than n_group={self.n_group}")
        self.num_experts = self.num_experts or 0
        self.moe_layer_freq = self.moe_layer_freq or 1
        if self.mlp_bias:
            raise ConfigError(f"config.json sets mlp_bias=true, which {self.model_type} support here lacks")
        if self.num_experts and self.n_group and self.num_experts % self.n_group:
            raise ConfigError(f"config.json: n_routed_experts={self.num_experts} is not a multiple of "
                              f"n_group={self.n_group}")

    def is_moe_layer(self, layer: int) -> bool:
        # transformers checks only first_k_dense_replace; the original code also honours moe_layer_freq
        # (1 in every released checkpoint, where the two rules agree)
        return (self.num_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    def rope_config(self) -> RopeConfig:
        return RopeConfig.from_config(self.raw, self.qk_rope_head_dim)

    def mla_options(self, interleaved: bool, rope_fp32: bool) -> MLAOptions:
        return MLAOptions(
            hidden=self.hidden_size, heads=self.num_attention_heads, q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim, rope=self.rope_config(),
            interleaved=interleaved, rope_fp32=rope_fp32, bias=self.attention_bias,
        )


@dataclass
class DeepseekV3Args(DeepseekV2Args):
    # transformers' DeepseekV3Config defaults
    n_shared_experts: int | None = 1
    first_k_dense_replace: int = 3
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str | None = "noaux_tc"
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    num_nextn_predict_layers: int = 1


class BiasedRouter(Router):
    """A Router with DeepSeek-V3's `e_score_correction_bias` (checkpoint name `mlp.gate.e_score_correction_bias`).

    The bias is kept in float32 whatever the model dtype (the map's `keep_fp32`): it only shifts which
    experts win, and bf16 rounding of it would change selections relative to the reference.
    """

    def __init__(self, hidden: int, num_experts: int, rule) -> None:
        super().__init__(hidden, num_experts, rule)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def selection_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid scores plus the correction bias: what noaux_tc selects by."""
        return torch.sigmoid(super().selection_scores(x)) + self.e_score_correction_bias.float()


class DeepseekV2(CausalLM):
    family = "deepseek_v2"
    Args = DeepseekV2Args
    checkpoint_map = CheckpointMap(keep_fp32=("e_score_correction_bias",), ignore_extra_layers=True)

    # ------------------------------------------------------------ family hooks
    def make_attention(self) -> MLAttention:
        # V2 rotates interleaved pairs as complex64 numbers, in float32 whatever the model dtype
        return MLAttention(self.args.mla_options(interleaved=True, rope_fp32=True))

    def make_router(self) -> Router:
        a = self.args
        method = a.topk_method or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"config.json: topk_method {method!r} is not supported for {self.family}")
        if method == "group_limited_greedy" and not (a.n_group and a.topk_group):
            raise ConfigError("config.json: topk_method group_limited_greedy needs n_group and topk_group")
        rule = deepseek_v2_topk(a.num_experts_per_tok, method, a.n_group, a.topk_group, a.routed_scaling_factor)
        return Router(a.hidden_size, a.num_experts, rule)

    def make_layer(self, i: int) -> DecoderLayer:
        a = self.args
        if a.is_moe_layer(i):
            shared = None
            if a.n_shared_experts:
                shared = MLP(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts, a.hidden_act)
            mlp: nn.Module = SparseMoE(i, self.make_router(), self.experts, shared=shared)
        else:
            mlp = MLP(a.hidden_size, a.intermediate_size, a.hidden_act)
        return DecoderLayer(self.make_attention(), mlp, a.hidden_size, a.rms_norm_eps, mlp_name="mlp")

    def make_rope(self, max_len: int, device, dtype) -> Rope:
        return Rope(self.args.rope_config(), max(max_len, 1), device, torch.float32)


class DeepseekV3(DeepseekV2):
    family = "deepseek_v3"
    Args = DeepseekV3Args

    def make_attention(self) -> MLAttention:
        return MLAttention(self.args.mla_options(interleaved=bool(self.args.rope_interleave), rope_fp32=False))

    def make_router(self) -> Router:
        a = self.args
        if a.n_group and a.topk_group and a.topk_group > a.n_group:
            raise ConfigError(f"config.json: topk_group={a.topk_group} exceeds n_group={a.n_group}")
        rule = deepseek_v3_noaux_tc(a.num_experts_per_tok, a.n_group, a.topk_group, bool(a.norm_topk_prob),
                                    a.routed_scaling_factor)
        return BiasedRouter(a.hidden_size, a.num_experts, rule)

    def make_rope(self, max_len: int, device, dtype) -> Rope:
        # cos/sin computed in float32 and cast to the activations' dtype, as the reference does
        return Rope(self.args.rope_config(), max(max_len, 1), device, dtype)
