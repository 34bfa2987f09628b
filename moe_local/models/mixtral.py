"""Mixtral: GQA attention (optional sliding window), softmax -> top-k -> renormalise, no shared expert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe_local.loading.checkpoint_map import CheckpointMap
from moe_local.models.base import CausalLM, DecoderLayer, ModelArgs
from moe_local.models.layers import Attention, AttentionOptions, Router, SparseMoE
from moe_local.models.routing import softmax_topk


@dataclass
class MixtralArgs(ModelArgs):
    sliding_window: int | None = None
    aliases: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}

    def __post_init_args__(self) -> None:
        super().__post_init_args__()
        self.moe_intermediate_size = self.intermediate_size
        self.norm_topk_prob = True


class Mixtral(CausalLM):
    family = "mixtral"
    Args = MixtralArgs
    checkpoint_map = CheckpointMap(experts="model.layers.{layer}.block_sparse_moe.experts",
                                   projections=("w1", "w3", "w2"))

    def make_layer(self, i: int) -> DecoderLayer:
        a = self.args
        attn = Attention(AttentionOptions(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                          sliding_window=a.sliding_window, rms_eps=a.rms_norm_eps))
        router = Router(a.hidden_size, a.num_experts, softmax_topk(a.num_experts_per_tok, normalize=True))
        moe = SparseMoE(i, router, self.experts)
        return DecoderLayer(attn, moe, a.hidden_size, a.rms_norm_eps, mlp_name="block_sparse_moe")
