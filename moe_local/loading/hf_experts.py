"""Routed experts read straight from a Hugging Face checkpoint, named by the family's `CheckpointMap`.

Three layouts exist on the hub and all are accepted:
- per-expert tensors: `<prefix>.{e}.gate_proj.weight` (Mixtral: `w1`/`w3`/`w2` for gate/up/down);
- fused 3-D tensors: `<prefix>.gate_up_proj` `[E, 2I, H]` (gate half first) and
  `<prefix>.down_proj` `[E, H, I]`, as transformers >= 5 holds them in memory (gpt-oss: transposed,
  gate/up rows interleaved, with `[E, 2I]` / `[E, H]` biases -- the map's flags say so);
- MXFP4 (gpt-oss on the hub): `<fused name>_blocks` + `_scales`, kept packed as the `mxfp4` scheme's
  codes and scales without any re-quantization (formats/schemes/mxfp4.py).
A fused tensor is sliced through the memory map, so loading one expert never reads the others.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from moe_local.experts import ExpertWeights, Projection
from moe_local.loading.checkpoint import Checkpoint, check_shape
from moe_local.loading.checkpoint_map import CheckpointMap

# (scheme name, packed tensors, (out, in)) -> a compute-ready projection. Loading sits below formats,
# so whoever builds a CheckpointExperts (models.weights) hands in the formats' constructor.
PackedFactory = Callable[[str, dict[str, torch.Tensor], tuple[int, int]], Projection]


class CheckpointExperts:
    """ExpertSource over a Hugging Face checkpoint (per-expert, fused or MXFP4 layout)."""

    def __init__(
        self,
        ckpt: Checkpoint,
        names: CheckpointMap,
        moe_layers: Sequence[int],
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        packed: PackedFactory | None = None,
    ) -> None:
        self.ckpt = ckpt
        self.packed = packed
        self.names = names
        self.moe_layers = list(moe_layers)
        self.num_experts = num_experts
        self.hidden = hidden_size
        self.inter = intermediate_size

    def is_mxfp4(self, layer: int) -> bool:
        return self.names.mxfp4_names(layer)[0] in self.ckpt

    def is_fused(self, layer: int) -> bool:
        return self.names.fused_names(layer)[0] in self.ckpt or self.is_mxfp4(layer)

    def tensor_names(self, layer: int, expert: int) -> list[str]:
        """The checkpoint tensors this expert's bytes come from (for sizing and hashing)."""
        biases = list(self.names.bias_names(layer) or ())
        if self.is_mxfp4(layer):
            return list(self.names.mxfp4_names(layer)) + biases
        if self.is_fused(layer):
            return list(self.names.fused_names(layer)) + biases
        return list(self.names.expert_names(layer, expert))

    def _slice(self, name: str, expert: int, shape: tuple[int, ...]) -> torch.Tensor:
        check_shape(name, self.ckpt.shape(name), shape, self.ckpt.file_of(name))
        return self.ckpt.get_expert_slice(name, expert)

    def _mxfp4(self, blocks: str, scales: str, expert: int, out_f: int, in_f: int) -> dict[str, torch.Tensor]:
        """One projection's MXFP4 codes [out, in/2] and scales [out, in/32], as they are on disk (a
        reshape, no arithmetic)."""
        E, G = self.num_experts, in_f // 32
        codes = self._slice(blocks, expert, (E, out_f, G, 16)).reshape(out_f, G * 16)
        return {"codes": codes, "scales": self._slice(scales, expert, (E, out_f, G))}

    def _make_packed(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> Projection:
        if self.packed is None:
            raise ValueError("an MXFP4 checkpoint needs CheckpointExperts(packed=...) (models.checkpoint_experts)")
        return self.packed("mxfp4", parts, shape)

    def _split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate and up rows of the fused [2I, ...] rows: halves, or alternate rows when interleaved.
        Packed codes and scales have the output channel first too, so they split the same way."""
        I = self.inter
        if self.names.interleaved:
            return gate_up[0::2].contiguous(), gate_up[1::2].contiguous()
        return gate_up[:I], gate_up[I:]

    def load(self, layer: int, expert: int) -> ExpertWeights:
        H, I, E = self.hidden, self.inter, self.num_experts
        if not self.is_fused(layer):
            g, u, d = self.names.expert_names(layer, expert)
            return ExpertWeights(
                self.ckpt.get(g, shape=(I, H)), self.ckpt.get(u, shape=(I, H)), self.ckpt.get(d, shape=(H, I))
            )
        gate: Projection
        up: Projection
        down: Projection
        if self.is_mxfp4(layer):
            gu_b, gu_s, down_b, down_s = self.names.mxfp4_names(layer)
            parts = self._mxfp4(gu_b, gu_s, expert, 2 * I, H)
            split = {k: self._split(v) for k, v in parts.items()}
            gate = self._make_packed({k: v[0] for k, v in split.items()}, (I, H))
            up = self._make_packed({k: v[1] for k, v in split.items()}, (I, H))
            down = self._make_packed(self._mxfp4(down_b, down_s, expert, H, I), (H, I))
        else:
            gu_name, down_name = self.names.fused_names(layer)
            if self.names.fused_transposed:
                gate_up = self._slice(gu_name, expert, (E, H, 2 * I)).t()
                down = self._slice(down_name, expert, (E, I, H)).t().contiguous()
            else:
                gate_up = self._slice(gu_name, expert, (E, 2 * I, H))
                down = self._slice(down_name, expert, (E, H, I))
            gate, up = self._split(gate_up)
        biases = self.names.bias_names(layer)
        if biases is None:
            return ExpertWeights(gate, up, down)
        gu_bias = self._slice(biases[0], expert, (E, 2 * I))
        gate_bias, up_bias = self._split(gu_bias[:, None])
        return ExpertWeights(gate, up, down, gate_bias[:, 0], up_bias[:, 0], self._slice(biases[1], expert, (E, H)))
