"""Routed experts read straight from a Hugging Face checkpoint.

Two layouts exist on the hub and both are accepted:
- per-expert tensors: `<prefix>.{e}.gate_proj.weight` (Mixtral: `w1`/`w3`/`w2` for gate/up/down);
- fused 3-D tensors: `<prefix>.gate_up_proj` `[E, 2I, H]` (gate half first) and
  `<prefix>.down_proj` `[E, H, I]`, as transformers >= 5 holds them in memory.
A fused tensor is sliced through the memory map, so loading one expert never reads the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from moe_local.experts import ExpertWeights
from moe_local.loading.checkpoint import Checkpoint, check_shape


@dataclass(frozen=True)
class ExpertLayout:
    """How a family names its routed experts in a checkpoint."""

    prefix: Callable[[int], str]  # layer -> e.g. "model.layers.3.mlp.experts"
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


class CheckpointExperts:
    """ExpertSource over a Hugging Face checkpoint (per-expert or fused layout)."""

    def __init__(
        self,
        ckpt: Checkpoint,
        layout: ExpertLayout,
        moe_layers: Sequence[int],
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
    ) -> None:
        self.ckpt = ckpt
        self.layout = layout
        self.moe_layers = list(moe_layers)
        self.num_experts = num_experts
        self.hidden = hidden_size
        self.inter = intermediate_size

    def is_fused(self, layer: int) -> bool:
        return f"{self.layout.prefix(layer)}.gate_up_proj" in self.ckpt

    def tensor_names(self, layer: int, expert: int) -> list[str]:
        """The checkpoint tensors this expert's bytes come from (for sizing and hashing)."""
        prefix = self.layout.prefix(layer)
        if self.is_fused(layer):
            return [f"{prefix}.gate_up_proj", f"{prefix}.down_proj"]
        return [f"{prefix}.{expert}.{n}.weight" for n in self.layout.names]

    def load(self, layer: int, expert: int) -> ExpertWeights:
        prefix = self.layout.prefix(layer)
        H, I, E = self.hidden, self.inter, self.num_experts
        if self.is_fused(layer):
            gu_name, down_name = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
            for name, shape in ((gu_name, (E, 2 * I, H)), (down_name, (E, H, I))):
                check_shape(name, self.ckpt.shape(name), shape, self.ckpt.file_of(name))
            gate_up = self.ckpt.get_expert_slice(gu_name, expert)
            return ExpertWeights(gate_up[:I], gate_up[I:], self.ckpt.get_expert_slice(down_name, expert))
        g, u, d = (f"{prefix}.{expert}.{n}.weight" for n in self.layout.names)
        return ExpertWeights(
            self.ckpt.get(g, shape=(I, H)), self.ckpt.get(u, shape=(I, H)), self.ckpt.get(d, shape=(H, I))
        )
