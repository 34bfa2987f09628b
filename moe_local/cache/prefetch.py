"""Router lookahead: guess the experts of layers L+1..L+D while layer L runs.

The residual stream changes little from one layer to the next, so the router of a later layer
applied to the current hidden state already names most of the experts that layer will pick
(measured on the shared trained model: see `router_recall` in a run report).

What we have at layer L's MoE block is `x = norm_L(h)` (RMSNorm with weight w_L). The router of
layer j expects `norm_j(h_j)`. Since both norms divide by the same RMS of h, `norm_j(h) =
x * w_j / w_L` exactly for the current h, so the prediction uses layer j's own norm weight without
any hook in the model code. (Channels where w_L is ~0 carry no information and are zeroed.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RouterLookahead:
    """predict(layer, x) -> [(depth, target_layer, ids sorted by confidence)] for depth 1..D."""

    def __init__(self, model, depth: int, extra: int = 0) -> None:
        self.depth = int(depth)
        self.extra = int(extra)
        self.routers = model.routers()
        self.moe_layers = sorted(self.routers)
        layers = model.model.layers
        self.norm_w: dict[int, torch.Tensor | None] = {}
        for l in self.moe_layers:
            norm = getattr(layers[l], "post_attention_layernorm", None)
            self.norm_w[l] = getattr(norm, "weight", None)
        self._ratio: dict[tuple[int, int], torch.Tensor | None] = {}

    def targets(self, layer: int) -> list[tuple[int, int]]:
        if layer not in self.routers:
            return []
        i = self.moe_layers.index(layer)
        return [(d, self.moe_layers[i + d]) for d in range(1, self.depth + 1) if i + d < len(self.moe_layers)]

    def _scale(self, src: int, dst: int) -> torch.Tensor | None:
        key = (src, dst)
        if key not in self._ratio:
            a, b = self.norm_w.get(src), self.norm_w.get(dst)
            if a is None or b is None:
                self._ratio[key] = None
            else:
                a32 = a.detach().float()
                ok = a32.abs() > 1e-6
                self._ratio[key] = torch.where(ok, b.detach().float() / torch.where(ok, a32, torch.ones_like(a32)),
                                               torch.zeros_like(a32))
        return self._ratio[key]

    @torch.inference_mode()
    def predict(self, layer: int, x: torch.Tensor) -> list[tuple[int, int, list[int]]]:
        out = []
        for d, target in self.targets(layer):
            router = self.routers[target]
            scale = self._scale(layer, target)
            xt = x if scale is None else (x.float() * scale.to(x.device)).to(x.dtype)
            ids, _ = router(xt)
            ranked: list[int] = []
            seen: set[int] = set()
            # per token, the rule's own top-k first (in rank order), tokens interleaved
            for col in ids.t().tolist():
                for e in col:
                    if e not in seen:
                        seen.add(e)
                        ranked.append(e)
            if self.extra > 0:
                logits = F.linear(xt.to(router.weight.dtype), router.weight).float()
                bias = getattr(router, "e_score_correction_bias", None)
                if bias is not None:
                    logits = torch.sigmoid(logits) + bias.float()
                k = min(ids.shape[-1] + self.extra, logits.shape[-1])
                spare = [e for e in torch.topk(logits, k, dim=-1).indices.t().reshape(-1).tolist() if e not in seen]
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
