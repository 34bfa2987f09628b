"""Qwen2-MoE / Qwen1.5-MoE: qkv bias, a sigmoid-gated shared expert beside the routed ones, softmax
top-k routing (renormalised only if `norm_topk_prob`), dense MLP layers where `mlp_only_layers` /
`decoder_sparse_step` say so, and sliding-window attention on the layers `layer_types` marks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from moe_local.models.base import CausalLM, DecoderLayer, ModelArgs
from moe_local.models.layers import MLP, Attention, AttentionOptions, Router, SparseMoE
from moe_local.models.routing import softmax_topk


@dataclass
class Qwen2MoeArgs(ModelArgs):
    qkv_bias: bool = True
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    aliases: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}

    def __post_init_args__(self) -> None:
        super().__post_init_args__()
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        self.decoder_sparse_step = self.decoder_sparse_step or 1
        if self.layer_types is None:
            # transformers' Qwen2MoeConfig rule, for config.json files written before `layer_types` existed
            self.layer_types = [
                "sliding_attention"
                if (i + 1) % 2 and i < self.max_window_layers and self.use_sliding_window
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]

    def is_moe_layer(self, layer: int) -> bool:
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer, or None; Qwen2MoeConfig zeroes it unless use_sliding_window."""
        if not self.use_sliding_window or not self.sliding_window:
            return None
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


class Qwen2Moe(CausalLM):
    family = "qwen2_moe"
    Args = Qwen2MoeArgs

    def make_layer(self, i: int) -> DecoderLayer:
        a = self.args
        attn = Attention(AttentionOptions(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                          qkv_bias=a.qkv_bias, sliding_window=a.window(i), rms_eps=a.rms_norm_eps))
        if a.is_moe_layer(i):
            router = Router(a.hidden_size, a.num_experts, softmax_topk(a.num_experts_per_tok, a.norm_topk_prob),
                            cast_weights=True)
            shared = MLP(a.hidden_size, a.shared_expert_intermediate_size, a.hidden_act)
            mlp = SparseMoE(i, router, self.experts, shared=shared, shared_name="shared_expert",
                            shared_gate=True, hidden=a.hidden_size)
        else:
            mlp = MLP(a.hidden_size, a.intermediate_size, a.hidden_act)
        return DecoderLayer(attn, mlp, a.hidden_size, a.rms_norm_eps)
