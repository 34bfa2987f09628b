"""OLMoE: RMS norm of q and k over the whole projection (before the head split), then clip_qkv on
q, k and v; softmax top-k routing, not renormalised by default; every layer is MoE, no shared
expert; routed experts have `intermediate_size` (there is no separate moe size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe_local.errors import ConfigError
from moe_local.models.base import CausalLM, DecoderLayer, ModelArgs
from moe_local.models.layers import Attention, AttentionOptions, Router, SparseMoE
from moe_local.models.routing import softmax_topk


@dataclass
class OlmoeArgs(ModelArgs):
    attention_bias: bool = False
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-5
    aliases: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}

    def __post_init_args__(self) -> None:
        # transformers sizes q_norm by hidden_size and k_norm by (hidden/heads)*kv_heads, so OLMoE
        # checkpoints only exist with head_dim = hidden/heads.
        derived = self.hidden_size // self.num_attention_heads
        if self.head_dim not in (None, derived):
            raise ConfigError(f"config.json: olmoe needs head_dim = hidden_size / num_attention_heads = {derived}, "
                              f"got head_dim {self.head_dim}")
        self.head_dim = derived
        self.moe_intermediate_size = self.intermediate_size


class Olmoe(CausalLM):
    family = "olmoe"
    Args = OlmoeArgs

    def make_layer(self, i: int) -> DecoderLayer:
        a = self.args
        attn = Attention(AttentionOptions(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                          qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="full",
                                          clip_qkv=a.clip_qkv, rms_eps=a.rms_norm_eps))
        router = Router(a.hidden_size, a.num_experts, softmax_topk(a.num_experts_per_tok, a.norm_topk_prob),
                        cast_weights=True)
        return DecoderLayer(attn, SparseMoE(i, router, self.experts), a.hidden_size, a.rms_norm_eps)
