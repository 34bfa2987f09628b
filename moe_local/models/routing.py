"""Top-k routing rules. Each takes (router module, hidden [T, H]) and returns (ids [T, k], weights [T, k]).

Routers compute in float32 like the reference implementations; the ids they pick decide which
experts a token touches, so they must match the reference exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_local.formats.compute import linear


def softmax_topk(top_k: int, normalize: bool):
    """Mixtral / Qwen-MoE / OLMoE: softmax over all experts, keep the top k, optionally renormalise."""

    def rule(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = linear(x, router.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights

    return rule


# --------------------------------------------------------------------------- DeepSeek-V2 / V3
def _group_mask(group_scores: torch.Tensor, topk_group: int, experts_per_group: int) -> torch.Tensor:
    """Boolean [T, E]: True for experts in each token's `topk_group` best groups."""
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores)
    mask.scatter_(1, group_idx, 1)
    return mask.unsqueeze(-1).expand(-1, -1, experts_per_group).reshape(group_scores.shape[0], -1).bool()


def deepseek_v2_topk(top_k: int, method: str, n_group: int | None, topk_group: int | None,
                     scaling: float = 1.0):
    """DeepSeek-V2: softmax scores; `greedy` top-k, or `group_limited_greedy` (groups ranked by their best
    expert, experts outside the best `topk_group` groups zeroed). Weights are the raw softmax scores
    times routed_scaling_factor: transformers' V2 router never renormalises (norm_topk_prob unused).
    """
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"unsupported DeepSeek-V2 topk_method {method!r}")

    def rule(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = linear(x.float(), router.weight)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if method == "group_limited_greedy":
            T, E = scores.shape
            per = E // n_group
            group_scores = scores.view(T, n_group, per).max(dim=-1).values
            scores = scores.masked_fill(~_group_mask(group_scores, topk_group, per), 0.0)
        weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
        return ids, weights * scaling

    return rule


def deepseek_v3_noaux_tc(top_k: int, n_group: int | None, topk_group: int | None, normalize: bool,
                         scaling: float):
    """DeepSeek-V3 / R1 `noaux_tc`: sigmoid scores; `e_score_correction_bias` is added for SELECTION
    only (groups ranked by the sum of their top-2 biased scores, best `topk_group` kept, then top-k);
    the weights are the unbiased sigmoid scores of the chosen experts, renormalised if
    `norm_topk_prob`, times routed_scaling_factor. Needs `router.e_score_correction_bias`.
    """
    groups = n_group or 1
    keep = topk_group or groups

    def rule(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = linear(x.float(), router.weight)
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias.float()
        T, E = choice.shape
        per = E // groups
        group_scores = choice.view(T, groups, per).topk(min(2, per), dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~_group_mask(group_scores, keep, per), float("-inf"))
        ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * scaling

    return rule


# --------------------------------------------------------------------------- DeepSeekMoE 16B
def deepseek_moe_gate(top_k: int, normalize: bool):
    """DeepSeekMoE's `MoEGate` (hub remote code): softmax over all experts in the activations' dtype
    (not float32: in bf16 the top-k is taken among bf16 scores, so ties fall as the reference's do),
    top-k, renormalised (+1e-20) only if `norm_topk_prob` and k > 1; no scaling factor."""
    renorm = normalize and top_k > 1

    def rule(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x, router.weight.to(x.dtype)).softmax(dim=-1)
        weights, ids = torch.topk(scores, top_k, dim=-1, sorted=False)
        if renorm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights

    return rule
