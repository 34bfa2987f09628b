"""Routed experts read straight from a Hugging Face checkpoint, named by the family's `CheckpointMap`.

Two layouts exist on the hub and both are accepted:
- per-expert tensors: `<prefix>.{e}.gate_proj.weight` (Mixtral: `w1`/`w3`/`w2` for gate/up/down);
- fused 3-D tensors: `<prefix>.gate_up_proj` `[E, 2I, H]` (gate half first) and
  `<prefix>.down_proj` `[E, H, I]`, as transformers >= 5 holds them in memory.
A fused tensor is sliced through the memory map, so loading one expert never reads the others.
"""

from __future__ import annotations

from typing import Sequence

from moe_local.experts import ExpertWeights
from moe_local.loading.checkpoint import Checkpoint, check_shape
from moe_local.loading.checkpoint_map import CheckpointMap


class CheckpointExperts:
    """ExpertSource over a Hugging Face checkpoint (per-expert or fused layout)."""

    def __init__(
        self,
        ckpt: Checkpoint,
        names: CheckpointMap,
        moe_layers: Sequence[int],
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
    ) -> None:
        self.ckpt = ckpt
        self.names = names
        self.moe_layers = list(moe_layers)
        self.num_experts = num_experts
        self.hidden = hidden_size
        self.inter = intermediate_size

    def is_fused(self, layer: int) -> bool:
        return self.names.fused_names(layer)[0] in self.ckpt

    def tensor_names(self, layer: int, expert: int) -> list[str]:
        """The checkpoint tensors this expert's bytes come from (for sizing and hashing)."""
        if self.is_fused(layer):
            return list(self.names.fused_names(layer))
        return list(self.names.expert_names(layer, expert))

    def load(self, layer: int, expert: int) -> ExpertWeights:
        H, I, E = self.hidden, self.inter, self.num_experts
        if self.is_fused(layer):
            gu_name, down_name = self.names.fused_names(layer)
            for name, shape in ((gu_name, (E, 2 * I, H)), (down_name, (E, H, I))):
                check_shape(name, self.ckpt.shape(name), shape, self.ckpt.file_of(name))
            gate_up = self.ckpt.get_expert_slice(gu_name, expert)
            return ExpertWeights(gate_up[:I], gate_up[I:], self.ckpt.get_expert_slice(down_name, expert))
        g, u, d = self.names.expert_names(layer, expert)
        return ExpertWeights(
            self.ckpt.get(g, shape=(I, H)), self.ckpt.get(u, shape=(I, H)), self.ckpt.get(d, shape=(H, I))
        )
