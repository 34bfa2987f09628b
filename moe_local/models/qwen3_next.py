"""Qwen3-Next (Qwen3-Next-80B-A3B): hybrid Gated DeltaNet / gated-attention layers (`hybrid.py`),
512 fine-grained experts with softmax top-k (renormalised if `norm_topk_prob`), and a shared expert
scaled by sigmoid(shared_expert_gate(x)) in every MoE layer.

- `layer_types` names each layer's token mixer ("linear_attention" / "full_attention"); configs
  without it get transformers' rule: every `full_attention_interval`-th layer (4) is full attention.
- Full attention: head_dim 256 by default, RoPE on `partial_rotary_factor` (0.25) of each head.
- Dense MLP layers where `mlp_only_layers` / `decoder_sparse_step` say so, as in Qwen2/3-MoE.
- Every RMSNorm is zero-centred (scales by 1 + weight) except the DeltaNet's gated output norm.

Checkpoint names (this family's whole name map): `model.layers.{l}.linear_attn.{in_proj_qkvz,
in_proj_ba, conv1d, dt_bias, A_log, norm, out_proj}` or `.self_attn.{q,k,v,o}_proj/{q,k}_norm`,
`.mlp.gate`, `.mlp.shared_expert.*`, `.mlp.shared_expert_gate`, routed experts under
`.mlp.experts` (per expert or fused); the multi-token-prediction head (`mtp.*`) is not run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from moe_local.errors import ConfigError
from moe_local.loading.checkpoint_map import CheckpointMap
from moe_local.models.base import DecoderLayer, ModelArgs
from moe_local.models.hybrid import (DeltaNetOptions, GatedAttention, GatedAttentionOptions, GatedDeltaNet,
                                     HybridCausalLM, ZeroCenteredRMSNorm)
from moe_local.models.layers import MLP, RopeConfig, Router, SparseMoE
from moe_local.models.routing import softmax_topk

MIXERS = ("linear_attention", "full_attention")


@dataclass
class Qwen3NextArgs(ModelArgs):
    # transformers' Qwen3NextConfig defaults, used only when config.json omits a key
    head_dim: int | None = 256
    attention_bias: bool = False
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    shared_expert_intermediate_size: int = 512
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    layer_types: list[str] | None = None
    full_attention_interval: int = 4
    partial_rotary_factor: float | None = None
    norm_topk_prob: bool = True

    positive: ClassVar[tuple[str, ...]] = ModelArgs.positive + (
        "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
        "linear_num_value_heads", "partial_rotary_factor")

    def __post_init_args__(self) -> None:
        super().__post_init_args__()
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        self.decoder_sparse_step = self.decoder_sparse_step or 1
        n = self.num_hidden_layers
        if self.layer_types is None:
            every = self.full_attention_interval or 4
            self.layer_types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
        if len(self.layer_types) != n or any(t not in MIXERS for t in self.layer_types):
            raise ConfigError(f"config.json: layer_types must name {' or '.join(MIXERS)} for each of the {n} layers")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(f"config.json: linear_num_value_heads={self.linear_num_value_heads} is not a multiple "
                              f"of linear_num_key_heads={self.linear_num_key_heads}")
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ConfigError(f"config.json: partial_rotary_factor gives {self.rotary_dim} rotary dims of "
                              f"head_dim={self.head_dim}; need an even number in 2..{self.head_dim}")

    def is_moe_layer(self, layer: int) -> bool:
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def rotary_dim(self) -> int:
        """RoPE'd dims per head: rope_parameters' partial_rotary_factor, else the top-level key, else 0.25."""
        rope = self.raw.get("rope_parameters") or {}
        factor = rope.get("partial_rotary_factor", self.partial_rotary_factor)
        return int(self.head_dim * (0.25 if factor is None else factor))

    def rope_config(self) -> RopeConfig:
        return RopeConfig.from_config(self.raw, self.rotary_dim)

    def attention_options(self) -> GatedAttentionOptions:
        return GatedAttentionOptions(self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                                     self.head_dim, self.rotary_dim, bias=self.attention_bias, rms_eps=self.rms_norm_eps)

    def deltanet_options(self, fused_projections: bool) -> DeltaNetOptions:
        return DeltaNetOptions(self.hidden_size, self.linear_num_key_heads, self.linear_num_value_heads,
                               self.linear_key_head_dim, self.linear_value_head_dim, self.linear_conv_kernel_dim,
                               fused_projections=fused_projections, act=self.hidden_act, rms_eps=self.rms_norm_eps)


class Qwen3Next(HybridCausalLM):
    family = "qwen3_next"
    Args = Qwen3NextArgs
    Norm = ZeroCenteredRMSNorm
    fused_projections: ClassVar[bool] = True  # in_proj_qkvz / in_proj_ba
    checkpoint_map = CheckpointMap(ignored=(r".*\.rotary_emb\.", r"mtp\."))  # the MTP head is not run

    def make_layer(self, i: int) -> DecoderLayer:
        a = self.args
        if a.layer_types[i] == "linear_attention":
            mixer, name = GatedDeltaNet(a.deltanet_options(self.fused_projections)), "linear_attn"
        else:
            mixer, name = GatedAttention(a.attention_options()), "self_attn"
        if a.is_moe_layer(i):
            router = Router(a.hidden_size, a.num_experts, softmax_topk(a.num_experts_per_tok, a.norm_topk_prob),
                            cast_weights=True)
            shared = MLP(a.hidden_size, a.shared_expert_intermediate_size, a.hidden_act)
            mlp = SparseMoE(i, router, self.experts, shared=shared, shared_name="shared_expert",
                            shared_gate=True, hidden=a.hidden_size)
        else:
            mlp = MLP(a.hidden_size, a.intermediate_size, a.hidden_act)
        return DecoderLayer(mixer, mlp, a.hidden_size, a.rms_norm_eps, attn_name=name, norm=ZeroCenteredRMSNorm)
