"""MiniMax-M2 (230B-A10B; M2.1 has the same architecture): GQA attention with RMS q/k norms over
the whole projection and partial rotary, every layer MoE, sigmoid routing with a correction bias, no
shared expert.

As transformers' MiniMaxM2* classes have it:
- q_norm / k_norm normalise the full q and k projections (all heads at once, OLMoE-style, the
  `qk_norm_type: per_layer` of the hub config), before the heads are split and RoPE applied;
  no projection carries a bias.
- RoPE covers the first `rotary_dim` dims of each head (64 of 128 on the hub; transformers turns the
  legacy key into `rope_parameters.partial_rotary_factor`, which wins when present).
- Routing: sigmoid of the router logits, the float32 `e_score_correction_bias` added for selection
  only, top-k, the chosen (unbiased) scores always renormalised, no scaling factor: DeepSeek-V3's
  `noaux_tc` rule with one group (`routing.deepseek_v3_noaux_tc`). Routed experts are
  `intermediate_size` wide (there is no dense MLP).
- The hub config also names the choices transformers hard-codes (`use_qk_norm`, `qk_norm_type`,
  `scoring_func`, `use_routing_bias`, `shared_intermediate_size`): a config asking for another one is
  refused rather than run as something else.

Checkpoint names (this family's whole name map): attention as usual (`self_attn.{q,k,v,o}_proj`,
`q_norm`, `k_norm`); the MoE block is `block_sparse_moe` with `gate.weight`, the correction bias as
`block_sparse_moe.e_score_correction_bias` (a sibling of the gate; our router holds it: the map's
one substitution) and Mixtral's per-expert `experts.{e}.w1/w3/w2` (gate, up, down), or fused.
Layers past `num_hidden_layers` (multi-token prediction) are never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe_local.errors import ConfigError
from moe_local.loading.checkpoint_map import CheckpointMap
from moe_local.models.base import CausalLM, DecoderLayer, ModelArgs
from moe_local.models.deepseek import BiasedRouter
from moe_local.models.layers import Attention, AttentionOptions, RopeConfig, SparseMoE
from moe_local.models.routing import deepseek_v3_noaux_tc

# config key -> the only value transformers' implementation runs (None: key absent is fine too)
FIXED_CHOICES = {"use_qk_norm": True, "qk_norm_type": "per_layer", "scoring_func": "sigmoid", "use_routing_bias": True}


@dataclass
class MiniMaxM2Args(ModelArgs):
    # transformers' MiniMaxM2Config defaults, used only when config.json omits a key
    head_dim: int | None = 128
    rotary_dim: int | None = None
    aliases: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}

    def __post_init_args__(self) -> None:
        super().__post_init_args__()
        self.moe_intermediate_size = self.intermediate_size  # experts are intermediate_size wide
        self.norm_topk_prob = True
        for key, want in FIXED_CHOICES.items():
            if key in self.raw and self.raw[key] != want:
                raise ConfigError(f"config.json: {key}={self.raw[key]!r} is not supported for minimax_m2 "
                                  f"(transformers' implementation runs {want!r})")
        if self.raw.get("shared_intermediate_size"):
            raise ConfigError("config.json: shared_intermediate_size > 0 (a shared expert) is not supported for minimax_m2")
        r = self.partial_rotary_dim
        if not 0 < r <= self.head_dim or r % 2:
            raise ConfigError(f"config.json: rotary_dim / partial_rotary_factor give {r} rotary dims of "
                              f"head_dim={self.head_dim}; need an even number in 2..{self.head_dim}")

    @property
    def partial_rotary_dim(self) -> int:
        """RoPE'd dims per head: rope_parameters' partial_rotary_factor, else `rotary_dim`, else all."""
        factor = (self.raw.get("rope_parameters") or {}).get("partial_rotary_factor")
        if factor is not None:
            return int(self.head_dim * factor)
        return int(self.rotary_dim or self.head_dim)

    def rope_config(self) -> RopeConfig:
        cfg = self.raw if ("rope_parameters" in self.raw or "rope_theta" in self.raw) else {**self.raw, "rope_theta": 5e6}
        return RopeConfig.from_config(cfg, self.partial_rotary_dim)


class MiniMaxM2(CausalLM):
    family = "minimax_m2"
    Args = MiniMaxM2Args

    # the correction bias sits beside the gate in the checkpoint; our router (the gate) holds it
    checkpoint_map = CheckpointMap(experts="model.layers.{layer}.block_sparse_moe.experts", projections=("w1", "w3", "w2"),
                                   substitutions=((".block_sparse_moe.gate.e_score_correction_bias",
                                                   ".block_sparse_moe.e_score_correction_bias"),),
                                   keep_fp32=("e_score_correction_bias",), ignore_extra_layers=True)

    def make_layer(self, i: int) -> DecoderLayer:
        a = self.args
        attn = Attention(AttentionOptions(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                          qk_norm="full", rms_eps=a.rms_norm_eps))
        rule = deepseek_v3_noaux_tc(a.num_experts_per_tok, 1, 1, normalize=True, scaling=1.0)
        moe = SparseMoE(i, BiasedRouter(a.hidden_size, a.num_experts, rule), self.experts)
        return DecoderLayer(attn, moe, a.hidden_size, a.rms_norm_eps, mlp_name="block_sparse_moe")
