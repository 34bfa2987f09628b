"""Top-k routing rules. Each takes (router module, hidden [T, H]) and returns (ids [T, k], weights [T, k]).

Routers compute in float32 like the reference implementations; the ids they pick decide which
experts a token touches, so they must match the reference exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_topk(top_k: int, normalize: bool):
    """Mixtral / Qwen-MoE / OLMoE: softmax over all experts, keep the top k, optionally renormalise."""

    def rule(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, router.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights

    return rule
