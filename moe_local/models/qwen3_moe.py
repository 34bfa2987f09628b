"""Qwen3-MoE: an explicit head_dim (not hidden/heads), per-head RMS norm of q and k before RoPE,
softmax top-k routing (renormalised if `norm_topk_prob`), no shared expert, dense MLP layers where
`mlp_only_layers` / `decoder_sparse_step` say so, one sliding window for all layers if enabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from moe_local.models.base import CausalLM, DecoderLayer, ModelArgs
from moe_local.models.layers import MLP, Attention, AttentionOptions, Router, SparseMoE
from moe_local.models.routing import softmax_topk


@dataclass
class Qwen3MoeArgs(ModelArgs):
    attention_bias: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    use_sliding_window: bool = False
    sliding_window: int | None = None
    # transformers 5 writes `num_local_experts` for this family; hub configs say `num_experts`
    aliases: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}

    def __post_init_args__(self) -> None:
        super().__post_init_args__()
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        self.decoder_sparse_step = self.decoder_sparse_step or 1
        if not self.use_sliding_window:  # Qwen3MoeConfig drops the window unless it is switched on
            self.sliding_window = None

    def is_moe_layer(self, layer: int) -> bool:
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)


class Qwen3Moe(CausalLM):
    family = "qwen3_moe"
    Args = Qwen3MoeArgs

    def make_layer(self, i: int) -> DecoderLayer:
        a = self.args
        attn = Attention(AttentionOptions(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                          qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="head",
                                          sliding_window=a.sliding_window or None, rms_eps=a.rms_norm_eps))
        if a.is_moe_layer(i):
            router = Router(a.hidden_size, a.num_experts, softmax_topk(a.num_experts_per_tok, a.norm_topk_prob),
                            cast_weights=True)
            mlp = SparseMoE(i, router, self.experts)
        else:
            mlp = MLP(a.hidden_size, a.intermediate_size, a.hidden_act)
        return DecoderLayer(attn, mlp, a.hidden_size, a.rms_norm_eps)
