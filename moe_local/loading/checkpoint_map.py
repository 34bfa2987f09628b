"""How a family's checkpoint names its tensors: one declarative map, read by loading, quantizing and
inspecting alike.

Our parameter names equal the checkpoint's (`model.layers.3.self_attn.q_proj.weight`), so most of a
family's map is the defaults. What a map states:

- `experts`: where layer L's routed experts live ("{layer}" stands for L). Routed experts are never
  model parameters; `hf_experts.CheckpointExperts` reads them in either hub layout:
  per expert, `<experts>.<e>.<name>.weight` with `projections` naming gate, up and down
  (Mixtral: w1, w3, w2); or fused, `<experts>.<gate_up>` [E, 2I, H] (gate half first) and
  `<experts>.<down>` [E, H, I] with `fused` naming those two.
- `renames`: (our prefix, checkpoint prefix) pairs for a family whose module names differ from its
  checkpoint's names; the first matching pair applies (Kimi-K2.5: its text model under `language_model.`).
  `substitutions`: (our fragment, checkpoint fragment) pairs replaced anywhere in a name (gpt-oss
  calls the router `mlp.router`, ours is `mlp.gate` in every family).
- gpt-oss's fused experts differ three ways, each a flag: `fused_transposed` (save_pretrained
  writes gate_up `[E, H, 2I]` and down `[E, I, H]`, transformers' in-memory layout for this family),
  `interleaved` (gate and up alternate rows of gate_up instead of being halves) and
  `expert_biases` (the names of the `[E, 2I]` gate_up and `[E, H]` down bias tensors). Its hub
  checkpoints store gate_up and down as MXFP4 (`<name>_blocks` uint8 `[E, out, in/32, 16]` +
  `<name>_scales` e8m0 `[E, out, in/32]`, not transposed); `hf_experts` keeps those codes as they are.
- `keep_fp32`: parameters (by last name component, or by a dotted suffix) loaded in float32 whatever
  the run dtype, because rounding them would change which experts (DeepSeek-V3's
  `e_score_correction_bias`) or which keys (DeepSeek-V3.2's `indexer.weights_proj.weight`) win.
- `layouts`: for a family whose checkpoints come named in more than one way (DeepSeek-V4: the hub's
  original names and the ones transformers saves), the alternative `renames`, one per layout;
  `for_checkpoint` picks the first whose name for the embeddings the checkpoint holds. With
  layouts, `experts` is given in our naming and each layout's renames apply to it as well.
- `ignored`: regular expressions of checkpoint tensors deliberately never read (rotary buffers of
  old checkpoints), and `ignore_extra_layers` for checkpoints that store layers past
  `num_hidden_layers` (DeepSeek-V3's multi-token-prediction module).

FP8 block scales (`<name>_scale_inv`) are not part of a map: they are how a checkpoint *stores* a
tensor, not what the tensor is called, so `Checkpoint` folds them into the tensor it belongs to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class CheckpointMap:
    """A family's checkpoint names (see the module docstring); the defaults are the Hugging Face ones."""

    experts: str = "model.layers.{layer}.mlp.experts"
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    fused: tuple[str, str] = ("gate_up_proj", "down_proj")
    renames: tuple[tuple[str, str], ...] = ()
    substitutions: tuple[tuple[str, str], ...] = ()
    fused_transposed: bool = False
    interleaved: bool = False
    expert_biases: tuple[str, str] | None = None
    keep_fp32: tuple[str, ...] = ()
    ignored: tuple[str, ...] = (r".*\.rotary_emb\.",)
    ignore_extra_layers: bool = False
    layouts: tuple[tuple[tuple[str, str], ...], ...] = ()

    def for_checkpoint(self, has: Callable[[str], bool]) -> "CheckpointMap":
        """The map of the layout a checkpoint uses (`has(name)`: does it hold that tensor); itself
        for a family with one layout. Undecidable (no embeddings): the first layout, whose names
        then appear in the missing-tensor error."""
        if not self.layouts:
            return self
        maps = [replace(self, renames=renames, layouts=()) for renames in self.layouts]
        maps = [replace(m, experts=m.checkpoint_name(self.experts)) for m in maps]
        return next((m for m in maps if has(m.checkpoint_name("model.embed_tokens.weight"))), maps[0])

    def checkpoint_name(self, param: str) -> str:
        """The checkpoint tensor holding our parameter `param`."""
        for ours, theirs in self.renames:
            if param.startswith(ours):
                param = theirs + param[len(ours):]
                break
        for ours, theirs in self.substitutions:
            param = param.replace(ours, theirs)
        return param

    def our_name(self, name: str) -> str:
        """The inverse of `checkpoint_name`: a checkpoint tensor's name in our parameter naming."""
        for ours, theirs in self.substitutions:
            name = name.replace(theirs, ours)
        for ours, theirs in self.renames:
            if name.startswith(theirs):
                return ours + name[len(theirs):]
        return name

    def keeps_fp32(self, param: str) -> bool:
        return any(param == k or param.endswith("." + k) for k in self.keep_fp32)

    def expert_prefix(self, layer: int) -> str:
        return self.experts.format(layer=layer)

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """Per-expert layout: the checkpoint tensors of gate, up and down."""
        prefix = self.expert_prefix(layer)
        return tuple(f"{prefix}.{expert}.{name}.weight" for name in self.projections)  # type: ignore[return-value]

    def fused_names(self, layer: int) -> tuple[str, str]:
        """Fused layout: the [E, 2I, H] gate/up tensor and the [E, H, I] down tensor of a layer."""
        prefix = self.expert_prefix(layer)
        return f"{prefix}.{self.fused[0]}", f"{prefix}.{self.fused[1]}"

    def bias_names(self, layer: int) -> tuple[str, str] | None:
        """Fused layout with expert biases: the [E, 2I] gate/up and [E, H] down bias tensors."""
        if self.expert_biases is None:
            return None
        prefix = self.expert_prefix(layer)
        return f"{prefix}.{self.expert_biases[0]}", f"{prefix}.{self.expert_biases[1]}"

    def mxfp4_names(self, layer: int) -> tuple[str, str, str, str]:
        """MXFP4 fused layout: gate_up blocks, gate_up scales, down blocks, down scales."""
        gu, down = self.fused_names(layer)
        return f"{gu}_blocks", f"{gu}_scales", f"{down}_blocks", f"{down}_scales"

    def is_ignored(self, name: str, num_layers: int) -> bool:
        """A checkpoint tensor this family never reads on purpose."""
        if self.ignore_extra_layers:
            m = _LAYER.match(self.our_name(name))
            if m and int(m.group(1)) >= num_layers:
                return True
        return any(re.match(pattern, name) for pattern in self.ignored)
