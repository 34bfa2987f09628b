"""gpt-oss (gpt-oss-20b, gpt-oss-120b): GQA attention with biases and a learned sink logit per head,
sliding-window and full attention alternating by `layer_types`, YaRN rope, a router with a bias
whose top-k logits are softmaxed, and routed experts with biases and a clamped SwiGLU.

The experts are the part that differs most, and all of it lives at the expert seam, not here:
- activation: `experts.ClampedSwiGLU(swiglu_alpha, swiglu_limit)` (`ModelArgs.expert_act`);
- biases: gate/up/down biases on every expert (`ExpertWeights.*_bias`, carried by packs);
- layout: save_pretrained writes gate_up `[E, H, 2I]` / down `[E, I, H]` (transposed) with gate and
  up in alternating rows; the hub ships them as MXFP4 blocks + e8m0 scales, which are kept as the
  `mxfp4` scheme's codes (formats/schemes/mxfp4.py) -- no dequantize/re-quantize step anywhere.
The router is `mlp.router` in the checkpoint and `mlp.gate` here, as in every other family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from moe_local.errors import ConfigError
from moe_local.experts import ClampedSwiGLU
from moe_local.formats.compute import linear
from moe_local.loading.checkpoint_map import CheckpointMap
from moe_local.models.base import CausalLM, DecoderLayer, ModelArgs
from moe_local.models.layers import Attention, AttentionOptions, Router, SparseMoE


def softmax_of_topk_logits(top_k: int):
    """gpt-oss: logits = W x + b; keep the top-k logits; their softmax is the weights (in x's dtype)."""

    def rule(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = linear(x, router.weight, router.bias)
        top, ids = torch.topk(logits, top_k, dim=-1)
        return ids, torch.softmax(top, dim=1, dtype=top.dtype)

    return rule


class BiasedRouter(Router):
    """A Router whose logits carry a bias (checkpoint `mlp.router.bias`)."""

    def __init__(self, hidden: int, num_experts: int, rule) -> None:
        super().__init__(hidden, num_experts, rule)
        self.bias = nn.Parameter(torch.empty(num_experts))

    def selection_scores(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias).float()


@dataclass
class GptOssArgs(ModelArgs):
    attention_bias: bool = True
    sliding_window: int | None = 128
    layer_types: list[str] | None = None
    swiglu_alpha: float = 1.702  # not in the hub configs: transformers' (and OpenAI's) constant
    swiglu_limit: float = 7.0
    aliases: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}
    positive: ClassVar[tuple[str, ...]] = ModelArgs.positive + ("sliding_window", "swiglu_alpha", "swiglu_limit")

    def __post_init_args__(self) -> None:
        super().__post_init_args__()
        self.moe_intermediate_size = self.intermediate_size
        if self.layer_types is None:  # GptOssConfig's default: sliding first, then alternating
            self.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"config.json: layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise ConfigError(f"config.json: layer_types holds {unknown[0]!r}; gpt-oss layers are "
                              "'sliding_attention' or 'full_attention'")

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def expert_act(self) -> ClampedSwiGLU:
        return ClampedSwiGLU(float(self.swiglu_alpha), float(self.swiglu_limit))

    def expert_params(self) -> int:
        return super().expert_params() + 2 * self.moe_intermediate_size + self.hidden_size  # + biases


class GptOss(CausalLM):
    family = "gpt_oss"
    Args = GptOssArgs
    checkpoint_map = CheckpointMap(substitutions=((".mlp.gate.", ".mlp.router."),), fused_transposed=True,
                                   interleaved=True, expert_biases=("gate_up_proj_bias", "down_proj_bias"))

    def make_layer(self, i: int) -> DecoderLayer:
        a = self.args
        attn = Attention(AttentionOptions(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                          qkv_bias=a.attention_bias, o_bias=a.attention_bias,
                                          sliding_window=a.window(i), rms_eps=a.rms_norm_eps, sinks=True))
        router = BiasedRouter(a.hidden_size, a.num_experts, softmax_of_topk_logits(a.num_experts_per_tok))
        return DecoderLayer(attn, SparseMoE(i, router, self.experts), a.hidden_size, a.rms_norm_eps)
