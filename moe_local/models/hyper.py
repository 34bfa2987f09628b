"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4): a residual stream of `n` parallel copies.

Instead of `x + block(norm(x))`, a layer keeps `n` streams `S [T, n, H]` and, around each block
(attention, then MLP), derives three mixing weights from the streams themselves (one linear map of
the RMS-normed, flattened streams, `fn`, plus `base`, each part scaled by its `scale`):

- pre  [T, n]    = sigmoid(.) + eps         collapses the streams into the block's input sum_i pre_i S_i;
- post [T, n]    = 2 sigmoid(.)             spreads the block's output back over the streams;
- comb [T, n, n] = Sinkhorn(softmax(.)+eps) mixes the old streams, projected (`iters` Sinkhorn-Knopp
  steps, columns first) onto doubly-stochastic matrices so the residual cannot blow up with depth;

and the new streams are `post_i * out + sum_j comb[j, i] S_j`. The final "head" collapses the streams
once more with its own `pre` before the last norm. Everything is computed in float32, as the
reference keeps these parameters and their arithmetic (they are `keep_fp32` in the checkpoint map).
The parameters belong to the caller (they are named `hc_attn_fn`, ... directly on a decoder layer in
the checkpoints), so these are functions of them, not modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, the rms taken in float32 (the reference's unweighted RMSNorm)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def hc_weights(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int,
               hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """streams [T, n, H] -> (post [T, n], comb [T, n, n], the collapsed block input [T, H])."""
    T, n, _ = streams.shape
    mixes = F.linear(rms_unweighted(streams.reshape(T, -1).float(), norm_eps), fn.float())
    pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.float().split([n, n, n * n])
    pre_s, post_s, comb_s = scale.float().unbind(0)
    pre = torch.sigmoid(pre_w * pre_s + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * post_s + post_b)
    comb = torch.softmax(comb_w.view(T, n, n) * comb_s + comb_b.view(n, n), dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
    return post, comb, collapsed


def hc_expand(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """The streams after a block: post_i * out + sum_j comb[j, i] * streams_j ([T, n, H])."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


def hc_collapse(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
                norm_eps: float) -> torch.Tensor:
    """The final collapse of the streams [T, n, H] -> [T, H] (the model's `hc_head`)."""
    T = streams.shape[0]
    mixes = F.linear(rms_unweighted(streams.reshape(T, -1).float(), norm_eps), fn.float())
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
