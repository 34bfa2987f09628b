"""DeepSeek Sparse Attention (DeepSeek-V3.2): MLA whose queries see only the keys a small "lightning
indexer" picks.

For each query the indexer scores every cached key with its own cheap heads,
`score[t, s] = sum_h w[t, h] * relu(q_idx[t, h] . k_idx[s]) / sqrt(index_head_dim)` (the per-head
weights `w = weights_proj(x) / sqrt(index_n_heads)`), hides the causally invisible keys, and keeps
the `index_topk` best; MLA then attends over the causal mask AND that selection. While the sequence
is no longer than `index_topk` the selection is every visible key, so only the indexer's keys are
cached and nothing is scored.

The indexer keys (`index_head_dim` numbers per token, normed by a LayerNorm and rotated on their
first `qk_rope_head_dim` dims with half-split RoPE, unlike MLA's interleaved pairs) are cached in
the same per-layer buffer as MLA's latent and rope key (`IndexedMLACache`).

The reference (transformers' DeepseekV32Indexer) skips the original's Hadamard rotation and FP8
scoring: the rotation is orthogonal (dot products unchanged) and FP8 is a speed trick, so plain
float scoring is the model's math; we follow the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_local.models.layers import Linear, apply_rope, attention_mask
from moe_local.models.mla import MLACache, MLAOptions, MLAttention

# Query rows scored at once: bounds the [rows, heads, keys] float32 score block to ~64 MiB at long contexts.
_SCORE_ELEMS = 1 << 24


@dataclass
class IndexerOptions:
    hidden: int
    q_lora_rank: int
    heads: int  # index_n_heads
    head_dim: int  # index_head_dim
    rope_dim: int  # qk_rope_head_dim: the rotated leading dims of each indexer head
    topk: int  # index_topk


class IndexedMLACache(MLACache):
    """MLACache plus the indexer's key per token: [max_len, kv_lora_rank + rope + index_head_dim]."""

    def __init__(self, max_len: int, kv_lora_rank: int, rope_dim: int, index_dim: int, device, dtype) -> None:
        super().__init__(max_len, kv_lora_rank, rope_dim, device, dtype, extra=index_dim)

    def update_index(self, start: int, keys: torch.Tensor) -> torch.Tensor:
        """Write the indexer keys of tokens start..start+T-1; return those of all cached tokens [S, D]."""
        end = start + keys.shape[0]
        self.buf[start:end, self.rope_end:] = keys
        return self.buf[:end, self.rope_end:]


class Indexer(nn.Module):
    """Parameter names follow the checkpoints: `self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`."""

    def __init__(self, o: IndexerOptions) -> None:
        super().__init__()
        self.o = o
        self.wq_b = Linear(o.q_lora_rank, o.heads * o.head_dim, bias=False)
        self.wk = Linear(o.hidden, o.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(o.head_dim, eps=1e-6)
        # kept in float32 whatever the model dtype (the family's keep_fp32), as the reference keeps it
        self.weights_proj = Linear(o.hidden, o.heads, bias=False)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Half-split RoPE on the first rope_dim dims. x: [T, ..., D]; cos/sin: [T, rope_dim]."""
        r = self.o.rope_dim
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (r,)
        rot = apply_rope(x[..., :r], cos.to(x.dtype).view(shape), sin.to(x.dtype).view(shape))
        return torch.cat([rot, x[..., r:]], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[T, head_dim]: what the cache keeps per token."""
        return self._rope(self.k_norm(self.wk(x)), cos, sin)

    def scores(self, x: torch.Tensor, q_resid: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """Index scores [T, S] of the T new queries against all S cached keys, in float32."""
        o, T = self.o, x.shape[0]
        q = self._rope(self.wq_b(q_resid).view(T, o.heads, o.head_dim), cos, sin).float()
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * o.heads**-0.5  # [T, H]
        k = keys.float().t()  # [D, S]
        rows = max(1, _SCORE_ELEMS // (o.heads * keys.shape[0]))
        out = []
        for i in range(0, T, rows):
            s = F.relu(torch.matmul(q[i:i + rows], k) * o.head_dim**-0.5)  # [t, H, S]
            out.append(torch.matmul(w[i:i + rows, None, :], s).squeeze(1))  # sum over heads, weighted
        return torch.cat(out)


class IndexedMLAttention(MLAttention):
    """MLA (DeepSeek-V3 interleaved RoPE, q_lora_rank required) restricted to the indexer's top-k keys."""

    def __init__(self, o: MLAOptions, index: IndexerOptions) -> None:
        super().__init__(o)
        self.indexer = Indexer(index)
        self.cache: IndexedMLACache | None = None

    def setup_cache(self, max_len: int, device, dtype) -> None:
        o = self.o
        self.cache = IndexedMLACache(max_len, o.kv_lora_rank, o.qk_rope_head_dim, self.indexer.o.head_dim,
                                     device, dtype)

    def key_mask(self, x: torch.Tensor, q_resid: torch.Tensor | None, start: int,
                 rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        T = x.shape[0]
        cos, sin = rope
        keys = self.cache.update_index(start, self.indexer.keys(x, cos, sin))
        causal = attention_mask(start, T, x.device)
        S, topk = keys.shape[0], self.indexer.o.topk
        if S <= topk:  # every visible key is selected: the causal mask alone
            return causal
        scores = self.indexer.scores(x, q_resid, keys, cos, sin)
        if causal is not None:
            scores = scores.masked_fill(~causal, float("-inf"))
        chosen = scores.topk(topk, dim=-1).indices
        keep = torch.zeros(T, S, dtype=torch.bool, device=x.device).scatter_(-1, chosen, True)
        return keep if causal is None else keep & causal
