"""Multi-head Latent Attention (DeepSeek-V2 / V3) with a compressed KV cache.

MLA projects each token to a small latent `c = norm(kv_a(x))[:kv_lora_rank]` plus one rope key
`k_pe` shared by all heads. Per-head keys and values are `kv_b_proj(c)`, so the cache only needs
`c` and the rotated `k_pe`: kv_lora_rank + qk_rope_head_dim numbers per token per layer (576 at
V3 sizes, against 2 * 128 heads * 192 for full K/V). That is the whole point of MLA, so we store
exactly that and expand (or absorb) at attention time.

Two ways to attend over the latent cache, equal in exact arithmetic:
- expanded (prefill): run kv_b_proj over every cached latent to get full K/V, then plain attention
  — the op order of transformers' eager implementation, so prefill logits match it to ~1e-6;
- absorbed (decode): fold kv_b_proj's key half into the query (q_nope @ W_uk) and its value half
  into the output (attn @ c @ W_uv^T), so each new token costs O(cached tokens * kv_lora_rank)
  instead of re-expanding the whole cache every step.

RoPE is applied only to the qk_rope_head_dim dims ("decoupled RoPE"). DeepSeek checkpoints keep
those dims as interleaved pairs (x0, x1), (x2, x3)...: V2 rotates them as complex numbers, V3 with
`rope_interleave` rotates the even/odd slices and lays the result out de-interleaved. The two
layouts differ only by a permutation applied identically to q and k, which leaves q.k unchanged,
so both are served by `rope_interleaved` below. V3 with rope_interleave=false uses rotate_half.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_local.formats.schemes import PackedWeight

from moe_local.models.layers import (
    Linear, RMSNorm, RopeConfig, apply_mask, apply_rope, attend, attention_mask, yarn_get_mscale,
)


@dataclass
class MLAOptions:
    hidden: int
    heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeConfig
    interleaved: bool = True  # rope dims stored as interleaved pairs (V2 always, V3 rope_interleave)
    rope_fp32: bool = False  # V2 rotates in float32 (complex64) whatever the model dtype
    bias: bool = False  # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj
    lora_eps: float = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's correction)."""
        scale = self.qk_head_dim**-0.5
        if self.rope.kind not in ("default", None) and self.rope.mscale_all_dim:
            m = yarn_get_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale = scale * m * m
        return scale


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle i; output de-interleaved (evens' images, then odds').

    x: [..., T, d]; cos/sin: [T, d] laid out as cat(freqs, freqs), so the first half is per pair.
    """
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class MLACache:
    """Per layer, per token: the normed latent (kv_lora_rank) and the rotated rope key (qk_rope_head_dim).

    One buffer [max_len, kv_lora_rank + qk_rope_head_dim (+ extra)]; `latent` and `k_pe` are views
    into it. `extra` columns after them belong to a subclass (DeepSeek-V3.2's indexer keys, `dsa.py`).
    """

    def __init__(self, max_len: int, kv_lora_rank: int, rope_dim: int, device, dtype, extra: int = 0) -> None:
        self.kv_lora_rank = kv_lora_rank
        self.rope_end = kv_lora_rank + rope_dim
        self.buf = torch.zeros(max_len, self.rope_end + extra, device=device, dtype=dtype)

    @property
    def values_per_token(self) -> int:
        return self.buf.shape[1]

    def update(self, start: int, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write tokens start..start+T-1; return the latents [S, L] and rope keys [S, R] of all S cached tokens."""
        end = start + latent.shape[0]
        L, R = self.kv_lora_rank, self.rope_end
        self.buf[start:end, :L] = latent
        self.buf[start:end, L:R] = k_pe
        return self.buf[:end, :L], self.buf[:end, L:R]

    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()


class MLAttention(nn.Module):
    """DeepSeek MLA; parameter names follow the checkpoints (`q_a_proj`, `kv_a_proj_with_mqa`, ...).

    `absorb`: None = absorbed when the new tokens are few relative to the cache (decode), expanded
    otherwise (prefill); True / False force one path (tests check both give the same logits).
    """

    def __init__(self, o: MLAOptions) -> None:
        super().__init__()
        self.o = o
        H = o.heads
        if o.q_lora_rank is None:
            self.q_proj = Linear(o.hidden, H * o.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(o.hidden, o.q_lora_rank, bias=o.bias)
            self.q_a_layernorm = RMSNorm(o.q_lora_rank, o.lora_eps)
            self.q_b_proj = Linear(o.q_lora_rank, H * o.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(o.hidden, o.kv_lora_rank + o.qk_rope_head_dim, bias=o.bias)
        self.kv_a_layernorm = RMSNorm(o.kv_lora_rank, o.lora_eps)
        self.kv_b_proj = Linear(o.kv_lora_rank, H * (o.qk_nope_head_dim + o.v_head_dim), bias=False)
        self.o_proj = Linear(H * o.v_head_dim, o.hidden, bias=o.bias)
        self.scale = o.softmax_scale
        self.absorb: bool | None = None
        self.cache: MLACache | None = None

    def setup_cache(self, max_len: int, device, dtype) -> None:
        self.cache = MLACache(max_len, self.o.kv_lora_rank, self.o.qk_rope_head_dim, device, dtype)

    # ------------------------------------------------------------------ pieces
    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.o.rope_fp32:
            x, cos, sin = x.float(), cos.float(), sin.float()
        else:
            cos, sin = cos.to(dtype), sin.to(dtype)
        out = rope_interleaved(x, cos, sin) if self.o.interleaved else apply_rope(x, cos, sin)
        return out.to(dtype)

    def _q_resid(self, x: torch.Tensor) -> torch.Tensor | None:
        """The normed query latent q_a_layernorm(q_a_proj(x)) [T, q_lora_rank]; None without q_lora_rank."""
        return None if self.o.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))

    def _queries(self, x: torch.Tensor, q_resid: torch.Tensor | None) -> torch.Tensor:
        """[H, T, qk_head_dim]"""
        o, T = self.o, x.shape[0]
        q = self.q_proj(x) if q_resid is None else self.q_b_proj(q_resid)
        return q.view(T, o.heads, o.qk_head_dim).transpose(0, 1)

    def key_mask(self, x: torch.Tensor, q_resid: torch.Tensor | None, start: int,
                 rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """Boolean [T, S] of the cached keys each query may see (None: all). Plain MLA: causal;
        DeepSeek-V3.2 (`dsa.py`) further restricts it to its indexer's top-k keys."""
        return attention_mask(start, x.shape[0], x.device)

    def _kv_b(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_uk [H, nope, L] and W_uv [H, v, L] in `dtype`.

        The absorbed path multiplies by these halves as matrices, not through a linear: views of the
        weight when it is held in `dtype`; a bf16-held (or packed) weight is cast for this call only,
        a temporary the size of kv_b_proj, never kept."""
        o = self.o
        w = self.kv_b_proj.weight
        w = w.dequantize() if isinstance(w, PackedWeight) else w
        w = w.to(dtype).view(o.heads, o.qk_nope_head_dim + o.v_head_dim, o.kv_lora_rank)
        return w[:, : o.qk_nope_head_dim], w[:, o.qk_nope_head_dim :]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, start: int, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        o, T = self.o, x.shape[0]
        q_resid = self._q_resid(x)
        q = self._queries(x, q_resid)
        q_nope, q_pe = q.split([o.qk_nope_head_dim, o.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([o.kv_lora_rank, o.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        cos, sin = rope
        q_pe = self._rope(q_pe, cos, sin)
        k_pe = self._rope(k_pe, cos, sin)
        assert self.cache is not None, "call model.setup_cache() first"
        latent, k_pe = self.cache.update(start, latent, k_pe)  # all S cached tokens
        S = latent.shape[0]
        mask = self.key_mask(x, q_resid, start, rope)
        absorb = self.absorb if self.absorb is not None else 4 * T <= S
        out = self._absorbed(q_nope, q_pe, latent, k_pe, mask) if absorb else \
            self._expanded(q_nope, q_pe, latent, k_pe, mask)
        return self.o_proj(out.transpose(0, 1).reshape(T, o.heads * o.v_head_dim))

    def _expanded(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """Full per-head K/V from the latents, then eager attention (transformers' op order)."""
        o, S = self.o, latent.shape[0]
        kv = self.kv_b_proj(latent).view(S, o.heads, o.qk_nope_head_dim + o.v_head_dim).transpose(0, 1)
        k_nope, v = kv.split([o.qk_nope_head_dim, o.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(0).expand(o.heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return attend(q, k, v, mask, self.scale)

    def _absorbed(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """Attention in latent space: scores = (q_nope W_uk) c^T + q_pe k_pe^T; out = (p c) W_uv^T."""
        w_uk, w_uv = self._kv_b(q_nope.dtype)
        q_lat = torch.matmul(q_nope, w_uk)  # [H, T, L]
        scores = apply_mask((torch.matmul(q_lat, latent.t()) + torch.matmul(q_pe, k_pe.t())) * self.scale, mask)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype)
        out_lat = torch.matmul(probs, latent)  # [H, T, L]
        return torch.matmul(out_lat, w_uv.transpose(-1, -2))  # [H, T, v]
