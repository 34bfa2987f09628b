"""The test oracle for DeepSeekMoE 16B (`model_type: deepseek`), which transformers does not ship (its
`modeling_deepseek.py` is hub remote code, never run here).

The oracle is assembled from transformers' own parts with the same math as that file (read from the
public deepseek-ai/deepseek-moe-16b-base `modeling_deepseek.py`):
- `LlamaForCausalLM` for everything but the MoE blocks: DeepSeekMoE's attention is "Copied from
  transformers.models.llama.modeling_llama.LlamaAttention" (q/k/v/o bias = `attention_bias`,
  head_dim = hidden / heads, rotate_half RoPE, linear `rope_scaling`), its RMSNorm, dense SwiGLU MLP
  and decoder layer are Llama's;
- each MoE layer's `mlp` replaced by `MoEWithShared`: transformers' Qwen3-MoE router and experts
  (softmax over all experts, top-k, renormalised iff asked -- DeepSeek's `MoEGate` with k > 1 --,
  SwiGLU experts weighted by the top-k scores) plus a Llama MLP of n_shared_experts *
  moe_intermediate_size as the shared experts, added unweighted, as `DeepseekMoE.forward` does.

`DeepseekMoeTinyConfig.save_reference` writes what the hub checkpoint holds (config.json with the
remote code's keys, per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`) and returns the oracle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class MoEWithShared(nn.Module):
    """DeepSeekMoE's MoE block from transformers parts: Qwen3-MoE's router + experts, Llama MLP shared experts."""

    def __init__(self, block: nn.Module, shared: nn.Module | None) -> None:
        super().__init__()
        self.gate, self.experts = block.gate, block.experts
        self.shared_experts = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        _, weights, ids = self.gate(flat)
        y = self.experts(flat, ids, weights).reshape(x.shape)
        return y if self.shared_experts is None else y + self.shared_experts(x)


@dataclass
class DeepseekMoeTinyConfig:
    """A DeepSeekMoE config.json (the remote code's keys); tiny by default."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 96
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    n_shared_experts: int | None = 2
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    extra: dict = field(default_factory=dict)  # further config.json keys, written as they are

    model_type = "deepseek"

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "torch_dtype": "float32",
                "bos_token_id": None, "eos_token_id": None, **d, **extra}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    # ------------------------------------------------------------------ the oracle
    def reference(self) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig
        from transformers.models.llama.modeling_llama import LlamaMLP
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {"rope_type": self.rope_scaling["type"], "factor": self.rope_scaling["factor"],
                    "rope_theta": self.rope_theta}
        llama = LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
                            rope_parameters=rope, attention_bias=self.attention_bias, mlp_bias=False,
                            hidden_act=self.hidden_act, tie_word_embeddings=self.tie_word_embeddings,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
        llama._attn_implementation = "eager"
        model = LlamaForCausalLM(llama).float()
        k = self.num_experts_per_tok
        moe = Qwen3MoeConfig(hidden_size=self.hidden_size, num_experts=self.n_routed_experts, num_experts_per_tok=k,
                             moe_intermediate_size=self.moe_intermediate_size, hidden_act=self.hidden_act,
                             norm_topk_prob=self.norm_topk_prob and k > 1)
        moe._experts_implementation = "eager"  # the experts run outside a transformers model: say which kernel
        for i, layer in enumerate(model.model.layers):
            if self.is_moe_layer(i):
                shared = None
                if self.n_shared_experts:
                    shared = LlamaMLP(LlamaConfig(hidden_size=self.hidden_size, hidden_act=self.hidden_act,
                                                  intermediate_size=self.moe_intermediate_size * self.n_shared_experts))
                layer.mlp = MoEWithShared(Qwen3MoeSparseMoeBlock(moe), shared)
        return model

    def save_reference(self, path: Path, seed: int = 0) -> nn.Module:
        """Random weights (seeded), written in the hub layout; returns the oracle holding them."""
        torch.manual_seed(seed)
        model = self.reference()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))  # norms start at 1: make them count
                elif name.endswith("mlp.gate.weight"):
                    p.normal_(0.0, 0.1)  # Qwen3-MoE's router starts at zero
                elif ".experts." in name or name.endswith("bias"):
                    p.normal_(0.0, 0.02)
        model.eval()
        tensors: dict[str, torch.Tensor] = {}
        for name, t in model.state_dict().items():
            if name.endswith("mlp.experts.gate_up_proj"):
                prefix, inter = name[: -len(".gate_up_proj")], self.moe_intermediate_size
                for e in range(t.shape[0]):
                    tensors[f"{prefix}.{e}.gate_proj.weight"] = t[e, :inter].clone()
                    tensors[f"{prefix}.{e}.up_proj.weight"] = t[e, inter:].clone()
            elif name.endswith("mlp.experts.down_proj"):
                prefix = name[: -len(".down_proj")]
                for e in range(t.shape[0]):
                    tensors[f"{prefix}.{e}.down_proj.weight"] = t[e].clone()
            else:
                tensors[name] = t.clone()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(self.to_json_string())
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return model
