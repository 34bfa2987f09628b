"""Router look-ahead: the experts layers L+1..L+D will pick, guessed while layer L runs.

The residual stream changes little from one layer to the next, so the router of a later layer
applied to the current hidden state already names most of the experts that layer will pick (the
run report's `router_recall` measures how many).

What we have at layer L's MoE block is `x = norm_L(h)` (RMSNorm with weight w_L). The router of
layer j expects `norm_j(h_j)`. Since both norms divide by the same RMS of h, `norm_j(h) =
x * w_j / w_L` exactly for the current h, so the prediction uses layer j's own norm weight (its
`gain()` for norms that scale by something else, like the zero-centred ones scaling by 1 + w).
(Channels where w_L is ~0 carry no information and are zeroed.)

The first MoE layer has no earlier MoE layer to predict it, so without more it is always a cold
miss. The model therefore also hands the hidden state of the nearest earlier points of the same
token to a listener (`listen`), predicted from the same way:
- the MLP input of every dense layer before an MoE layer (DeepSeek's `first_k_dense_replace`,
  Qwen2-MoE's `mlp_only_layers`): `norm_L(h)` exactly like an MoE block's, site "mlp";
- the attention input of the first MoE layer, `input_layernorm(h)` (site "attn"): the same RMS
  trick with the input norm's weight. It is the more accurate of the two (the dense MLP moves the
  residual stream a lot), the dense one the earlier (more time to load), so both are used.

A router marked `exact` (DeepSeek-V4's hash routing: experts from the token id by a frozen table)
picks the same experts whatever hidden state it sees, so its prediction is certain and gets no
spares. Its layer's attention input is a source too: there the layer before has released its
experts, so the cache has room to load this layer's even at the smallest budget (one layer's top-k).

`CausalLM.lookahead(depth, extra)` builds one; the expert cache uses it only through
`experts.ExpertPredictor`, never by looking inside the model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from moe_local.models.layers import Router

Listen = Callable[[Sequence[tuple[int, str]], Callable[[int, torch.Tensor, str], None]], Callable[[], None]]

SITES = ("attn", "mlp")  # where in a decoder layer the hidden state was taken: before attention / before the MLP
_NORMS = {"attn": "input_layernorm", "mlp": "post_attention_layernorm"}


class RouterLookahead:
    """experts.ExpertPredictor of a CausalLM: predict(layer, x, site) -> [(depth, target_layer, ids
    sorted by confidence)] for depth 1..D.

    Built by `CausalLM.lookahead` from the model's routers (layer -> Router), its decoder layers (for
    their norm weights) and its `listen`."""

    def __init__(self, routers: dict[int, Router], layers: Sequence[nn.Module], listen: Listen, depth: int,
                 extra: int = 0) -> None:
        self._listen = listen
        self.depth = int(depth)
        self.extra = int(extra)
        self.routers = routers
        self.moe_layers = sorted(self.routers)
        self.layers = layers
        # dense layers with an MoE layer after them predict the next MoE layers too
        self.dense_sources = [l for l in range(len(self.layers))
                              if l not in self.routers and self.moe_layers and l < self.moe_layers[-1]]
        self._ratio: dict[tuple[int, str, int], torch.Tensor | None] = {}

    def targets(self, layer: int, site: str = "mlp") -> list[tuple[int, int]]:
        """(depth, target layer) for the next `depth` MoE layers a source at (layer, site) precedes:
        the MoE layers after `layer`, and `layer` itself when the source is its attention input."""
        later = [m for m in self.moe_layers if m > layer or (site == "attn" and m == layer)]
        return list(enumerate(later[: self.depth], start=1))

    def sources(self) -> list[tuple[int, str]]:
        """The (layer, site) points before the first MoE layer's routing that `listen` reports, in
        execution order: dense layers' MLP inputs and the first MoE layer's attention input (and
        the attention input of every layer whose router is `exact`)."""
        if self.depth <= 0 or not self.moe_layers:
            return []
        out = [(l, "mlp") for l in self.dense_sources] + [(self.moe_layers[0], "attn")]
        out += [(l, "attn") for l in self.moe_layers[1:] if getattr(self.routers[l], "exact", False)]
        return sorted(out, key=lambda s: (s[0], SITES.index(s[1])))

    def listen(self, callback: Callable[[int, torch.Tensor, str], None]) -> Callable[[], None]:
        """Have the model call `callback(layer, x, site)` at every source during its forward passes:
        x is the normed hidden state the dense MLP / the first MoE layer's attention is about to
        consume. Returns the function that stops it."""
        return self._listen(self.sources(), callback)

    def _norm_weight(self, layer: int, site: str) -> torch.Tensor:
        """The norm's per-channel multiplier: `weight`, or `gain()` where the norm scales by something
        else (the zero-centred RMSNorms of Qwen3-Next / Qwen3.5 multiply by 1 + weight)."""
        norm = getattr(self.layers[layer], _NORMS[site])
        gain = getattr(norm, "gain", None)
        return gain() if callable(gain) else norm.weight

    def _scale(self, src: int, site: str, dst: int) -> torch.Tensor:
        key = (src, site, dst)
        if key not in self._ratio:
            a32 = self._norm_weight(src, site).detach().float()
            b = self._norm_weight(dst, "mlp")
            ok = a32.abs() > 1e-6
            self._ratio[key] = torch.where(ok, b.detach().float() / torch.where(ok, a32, torch.ones_like(a32)),
                                           torch.zeros_like(a32))
        return self._ratio[key]

    @torch.inference_mode()
    def predict(self, layer: int, x: torch.Tensor, site: str = "mlp") -> list[tuple[int, int, list[int]]]:
        """x [T, H]: the normed hidden state at (layer, site). For each of the next `depth` MoE
        layers, the ids its router picks for x (each token's top-k in rank order, tokens
        interleaved), then up to `extra` spare ids per token ranked by the router's selection score."""
        out = []
        for d, target in self.targets(layer, site):
            router = self.routers[target]
            scale = self._scale(layer, site, target)
            xt = (x.float() * scale.to(x.device)).to(x.dtype)
            ids, _ = router(xt)
            ranked: list[int] = []
            seen: set[int] = set()
            for col in ids.t().tolist():
                for e in col:
                    if e not in seen:
                        seen.add(e)
                        ranked.append(e)
            if self.extra > 0 and not getattr(router, "exact", False):
                scores = router.selection_scores(xt)
                k = min(ids.shape[-1] + self.extra, scores.shape[-1])
                spare = [e for e in torch.topk(scores, k, dim=-1).indices.t().reshape(-1).tolist() if e not in seen]
                added = 0
                for e in spare:
                    if e in seen:
                        continue
                    seen.add(e)
                    ranked.append(e)
                    added += 1
                    if added >= self.extra * max(1, x.shape[0]):
                        break
            out.append((d, target, ranked))
        return out
