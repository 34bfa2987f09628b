"""DeepSeekMoE 16B (`model_type: deepseek`, deepseek-moe-16b-base / -chat): Llama-style multi-head
attention with fine-grained routed experts plus shared experts. Hub remote code (its own
`modeling_deepseek.py`), not in transformers; what follows is that file's math:

- attention: q/k/v/o projections (all with a bias when `attention_bias`), head_dim = hidden / heads,
  rotate_half RoPE over the whole head (`rope_scaling` "linear" divides positions by its factor;
  "dynamic" NTK is refused: it rebuilds the tables by sequence length);
- a layer routes when `n_routed_experts` is set, layer >= `first_k_dense_replace` and
  layer % `moe_layer_freq` == 0; others get a dense SwiGLU of `intermediate_size`;
- router (`MoEGate`): softmax over the logits (`scoring_func` must be "softmax"), top-k, renormalised
  only if `norm_topk_prob` (false on the hub) and k > 1; no scaling factor, no groups;
- shared experts: one SwiGLU of n_shared_experts * moe_intermediate_size, added to every MoE
  layer's output (none when `n_shared_experts` is null).

Checkpoint names (this family's whole name map): the Hugging Face defaults -- `model.layers.{l}.self_attn.*`,
`.mlp.gate.weight`, `.mlp.shared_experts.*`, routed experts per expert under `.mlp.experts.{e}.`
(or fused); old checkpoints' `rotary_emb.inv_freq` buffers are not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe_local.errors import ConfigError
from moe_local.models.base import CausalLM, DecoderLayer, ModelArgs
from moe_local.models.layers import MLP, Attention, AttentionOptions, Router, SparseMoE
from moe_local.models.routing import deepseek_moe_gate


@dataclass
class DeepseekMoeArgs(ModelArgs):
    # the hub configuration_deepseek.py defaults, used only when config.json omits a key
    attention_bias: bool = False
    n_shared_experts: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"
    aliases: ClassVar[dict[str, str]] = {"n_routed_experts": "num_experts"}

    def __post_init_args__(self) -> None:
        super().__post_init_args__()
        self.num_experts = self.num_experts or 0
        if self.scoring_func != "softmax":
            raise ConfigError(f"config.json: scoring_func {self.scoring_func!r} is not supported for deepseek "
                              f"(its MoEGate only implements 'softmax')")
        if not self.moe_layer_freq or self.moe_layer_freq < 1:
            raise ConfigError(f"config.json: moe_layer_freq must be a positive integer, got {self.moe_layer_freq!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"config.json: hidden_size={self.hidden_size} is not a multiple of "
                              f"num_attention_heads={self.num_attention_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads  # the remote code has no head_dim key
        scaling = self.raw.get("rope_scaling") or {}
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in (None, "default", "linear"):
            raise ConfigError(f"config.json: rope_scaling type {kind!r} is not supported for deepseek (only 'linear')")

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0


class DeepseekMoe(CausalLM):
    family = "deepseek"
    Args = DeepseekMoeArgs

    def make_layer(self, i: int) -> DecoderLayer:
        a = self.args
        attn = Attention(AttentionOptions(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                          qkv_bias=a.attention_bias, o_bias=a.attention_bias, rms_eps=a.rms_norm_eps))
        if a.is_moe_layer(i):
            router = Router(a.hidden_size, a.num_experts, deepseek_moe_gate(a.num_experts_per_tok, bool(a.norm_topk_prob)))
            shared = MLP(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts, a.hidden_act) \
                if a.n_shared_experts else None
            mlp = SparseMoE(i, router, self.experts, shared=shared)
        else:
            mlp = MLP(a.hidden_size, a.intermediate_size, a.hidden_act)
        return DecoderLayer(attn, mlp, a.hidden_size, a.rms_norm_eps)
