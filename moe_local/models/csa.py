"""DeepSeek-V4 attention: shared-KV MQA over a sliding window, plus compressed long-range entries.

Every layer attends with one key/value head (K = V: one `wkv` projection, RMS-normed, rotated) over
the last `sliding_window` tokens. Layers of type
- "sliding_attention" stop there;
- "heavily_compressed_attention" (HCA) also see compressed entries: every `ratio` tokens (128 in
  V4-Flash) are pooled into one entry, a softmax-gated sum over the window (`wkv`, `wgate`, a
  learned per-slot bias `ape`), RMS-normed and rotated at the window's first position; a query at
  position p sees the entries whose window ended by p (w < (p + 1) // ratio);
- "compressed_sparse_attention" (CSA) pool every `ratio` (4) tokens with overlapping windows: each
  token projects two series, Ca and Cb ([.. | ..] halves of `wkv` / `wgate`), and entry w pools
  window w-1's Ca with window w's Cb over 2*ratio slots. A lightning indexer (its own compressor at
  `index_head_dim`, queries from the query latent, `sum_h w_h relu(q_h . k)` scores) keeps each
  query's `index_topk` best visible entries.
Queries are RMS-normed per head without a weight; RoPE covers the trailing `rope_dim` dims of each
head as interleaved pairs (sliding layers with the "main" base, compressed ones and their
compressor / indexer with the "compress" base, YaRN-scaled in the released models). Each head has a
learned attention sink (an extra logit that takes softmax mass and contributes nothing). Since V
carries the rotation of its key, the output's rope dims are rotated back by the query position. The
output projection is grouped: `o_groups` groups of heads, each mapped to `o_lora_rank` by its own
block of `wo_a`, then `wo_b` mixes all groups to hidden.

The cache (`V4AttentionState`) is small and mostly fixed: the last sliding_window-1 keys, the
compressors' unfinished window (fewer than `ratio` tokens), the previous window's Ca half (CSA),
and the compressed entries, which grow by one every `ratio` tokens. The unfinished window and the
overlap make it a running state like a recurrent one: a forward must start at 0 (reset) or exactly
where the state stopped (`pos`), which `DeepseekV4.can_resume` tells the generator.

Arithmetic follows transformers' DeepseekV4Attention / compressors op for op (softmax of the gates
and of the scores in float32, norms with float32 weights) so logits match it to ~1e-6 in float32.
Parameter names are the checkpoint's (`attn.wq_a`, `attn.compressor.wkv`, `attn.indexer.wq_b`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_local.formats.compute import linear
from moe_local.models.hyper import rms_unweighted
from moe_local.models.layers import Linear, rms_normalize

KINDS = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")


class Fp32RMSNorm(nn.Module):
    """RMSNorm whose (float32) weight multiplies in float32 before the one cast back (V4's order)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight.float() * rms_normalize(x, self.eps)).to(x.dtype)


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing 2*cos.shape[-1] dims of x as interleaved pairs (x[2i], x[2i+1]) by angle i,
    in float32, leaving the leading dims as they are. cos/sin: one entry per pair, broadcastable."""
    cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    r = cos.shape[-1]
    nope, rope = x[..., :-r], x[..., -r:]
    rotated = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat([nope, (rope.float() * cos + rotated.float() * sin).to(x.dtype)], dim=-1)


class RopeTable:
    """cos/sin [max_len, rope_dim / 2] (one per interleaved pair) for one rope base, in the model dtype."""

    def __init__(self, inv_freq: torch.Tensor, scale: float, max_len: int, device, dtype) -> None:
        freqs = torch.outer(torch.arange(max_len, dtype=torch.int64).float(), inv_freq.float())
        self.cos = (freqs.cos() * scale).to(device=device, dtype=dtype)
        self.sin = (freqs.sin() * scale).to(device=device, dtype=dtype)

    def at(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


@dataclass
class V4AttentionOptions:
    hidden: int
    heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int  # sliding_window
    kind: str  # one of KINDS
    ratio: int = 0  # compress rate of the layer's kind (0 for sliding layers)
    index_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    eps: float = 1e-6

    @property
    def rope_name(self) -> str:
        return "main" if self.kind == "sliding_attention" else "compress"


# --------------------------------------------------------------------------- compressors
class CompressorState:
    """One compressor's running state: the unfinished window, the last window's Ca half (overlapping
    compressors) and the entries emitted so far (preallocated for max_len tokens)."""

    def __init__(self, max_len: int, ratio: int, dim: int, device, dtype) -> None:
        self.entries = torch.zeros(max_len // ratio, dim, device=device, dtype=dtype)
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.buf_kv: torch.Tensor | None = None
        self.buf_gate: torch.Tensor | None = None
        self.overlap: tuple[torch.Tensor, torch.Tensor] | None = None

    def nbytes(self) -> int:
        return self.entries.numel() * self.entries.element_size()


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one entry of `dim` values (see the module docstring);
    `overlap`: CSA's two-series windows, else HCA's disjoint ones."""

    def __init__(self, hidden: int, dim: int, ratio: int, overlap: bool, eps: float) -> None:
        super().__init__()
        width = 2 * dim if overlap else dim
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        self.wkv = Linear(hidden, width, bias=False)
        self.wgate = Linear(hidden, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width))  # float32 (keep_fp32)
        self.norm = Fp32RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, st: CompressorState, rope: RopeTable) -> torch.Tensor:
        """Absorb x [T, hidden]; return every entry so far [count, dim]."""
        m, d = self.ratio, self.dim
        kv, gate = self.wkv(x), self.wgate(x)
        if st.buf_kv is not None:
            kv, gate = torch.cat([st.buf_kv, kv]), torch.cat([st.buf_gate, gate])
        usable = (kv.shape[0] // m) * m
        overlap = st.overlap
        if usable:
            W = usable // m
            ckv = kv[:usable].view(W, m, -1)
            cg = gate[:usable].view(W, m, -1) + self.ape
            if self.overlap:
                nkv = ckv.new_zeros(W, 2 * m, d)
                ng = cg.new_full((W, 2 * m, d), float("-inf"))
                nkv[:, m:], ng[:, m:] = ckv[..., d:], cg[..., d:]  # Cb: this window
                if W > 1:
                    nkv[1:, :m], ng[1:, :m] = ckv[:-1, :, :d], cg[:-1, :, :d]  # Ca: the window before
                if overlap is not None:
                    nkv[0, :m], ng[0, :m] = overlap[0].to(nkv.dtype), overlap[1].to(ng.dtype)
                overlap = (ckv[-1, :, :d].clone(), cg[-1, :, :d].clone())
                ckv, cg = nkv, ng
            pooled = self.norm((ckv * cg.softmax(dim=1, dtype=torch.float32).to(ckv.dtype)).sum(dim=1))
            cos, sin = rope.at(torch.arange(W, device=x.device) * m + st.count * m)
            st.entries[st.count : st.count + W] = rope_tail(pooled, cos, sin)
            st.count += W
        st.buf_kv, st.buf_gate, st.overlap = kv[usable:], gate[usable:], overlap
        return st.entries[: st.count]


class Indexer(nn.Module):
    """CSA's lightning indexer; names as the checkpoint: `indexer.{wq_b, weights_proj, compressor.*}`."""

    def __init__(self, o: V4AttentionOptions) -> None:
        super().__init__()
        self.o = o
        self.wq_b = Linear(o.q_lora_rank, o.index_heads * o.index_head_dim, bias=False)
        self.weights_proj = Linear(o.hidden, o.index_heads, bias=False)
        self.compressor = Compressor(o.hidden, o.index_head_dim, o.ratio, overlap=True, eps=o.eps)

    def visible(self, x: torch.Tensor, q_res: torch.Tensor, st: CompressorState, rope: RopeTable, cos: torch.Tensor,
                sin: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean [T, N]: each query's top-`index_topk` entries among the `allowed` (causally visible) ones."""
        o, T = self.o, x.shape[0]
        keys = self.compressor(x, st, rope)  # always absorbed: the state must advance
        N = keys.shape[0]
        if N <= o.index_topk:  # every visible entry is among the top k
            return allowed
        q = rope_tail(self.wq_b(q_res).view(T, o.index_heads, o.index_head_dim), cos[:, None], sin[:, None])
        scores = F.relu(torch.matmul(q.float(), keys.float().t())) * o.index_head_dim**-0.5  # [T, h, N]
        w = self.weights_proj(x).float() * o.index_heads**-0.5  # [T, h]
        scores = (scores * w.unsqueeze(-1)).sum(dim=1).masked_fill(~allowed, float("-inf"))
        chosen = scores.topk(o.index_topk, dim=-1).indices
        return torch.zeros_like(allowed).scatter_(-1, chosen, True) & allowed


# --------------------------------------------------------------------------- attention
class V4AttentionState:
    """A layer's cache: the last window-1 keys, the compressor states, and `pos`, the tokens absorbed."""

    def __init__(self, o: V4AttentionOptions, max_len: int, device, dtype) -> None:
        self.window = torch.zeros(max(o.window - 1, 0), o.head_dim, device=device, dtype=dtype)
        self.comp = CompressorState(max_len, o.ratio, o.head_dim, device, dtype) if o.ratio else None
        self.index = (CompressorState(max_len, o.ratio, o.index_head_dim, device, dtype)
                      if o.kind == "compressed_sparse_attention" else None)
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0
        for st in (self.comp, self.index):
            if st is not None:
                st.reset()

    def nbytes(self) -> int:
        return self.window.numel() * self.window.element_size() + sum(
            st.nbytes() for st in (self.comp, self.index) if st is not None)


class V4Attention(nn.Module):
    def __init__(self, o: V4AttentionOptions) -> None:
        super().__init__()
        self.o = o
        H, D = o.heads, o.head_dim
        self.wq_a = Linear(o.hidden, o.q_lora_rank, bias=False)
        self.q_norm = Fp32RMSNorm(o.q_lora_rank, o.eps)
        self.wq_b = Linear(o.q_lora_rank, H * D, bias=False)
        self.wkv = Linear(o.hidden, D, bias=False)
        self.norm = Fp32RMSNorm(D, o.eps)
        # grouped output: o_groups blocks [o_lora_rank, H*D/o_groups] stacked, then one mix to hidden
        self.wo_a = Linear(H * D // o.o_groups, o.o_groups * o.o_lora_rank, bias=False)
        self.wo_b = Linear(o.o_groups * o.o_lora_rank, o.hidden, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H))  # float32 (keep_fp32)
        if o.ratio:
            self.compressor = Compressor(o.hidden, D, o.ratio, overlap=o.kind == "compressed_sparse_attention",
                                         eps=o.eps)
        if o.kind == "compressed_sparse_attention":
            self.indexer = Indexer(o)
        self.scale = D**-0.5
        self.cache: V4AttentionState | None = None

    def setup_cache(self, max_len: int, device, dtype) -> None:
        self.cache = V4AttentionState(self.o, max_len, device, dtype)

    def forward(self, x: torch.Tensor, start: int, ropes: dict[str, RopeTable]) -> torch.Tensor:
        o, T = self.o, x.shape[0]
        st = self.cache
        assert st is not None, "call model.setup_cache() first"
        if start == 0:
            st.reset()
        elif start != st.pos:
            raise ValueError(f"the attention state holds {st.pos} tokens; it cannot continue at position {start}")
        rope = ropes[o.rope_name]
        cos, sin = rope.at(slice(start, start + T))
        q_res = self.q_norm(self.wq_a(x))
        q = rms_unweighted(self.wq_b(q_res).view(T, o.heads, o.head_dim), o.eps)
        q = rope_tail(q, cos[:, None], sin[:, None]).transpose(0, 1)  # [H, T, D]
        kv = rope_tail(self.norm(self.wkv(x)), cos, sin)  # [T, D]: key and value at once
        prev = st.window[: min(start, st.window.shape[0])] if start else st.window[:0]
        keys = torch.cat([prev, kv])  # positions start - len(prev) .. start + T - 1
        qpos = torch.arange(start, start + T, device=x.device)[:, None]
        kpos = torch.arange(start - prev.shape[0], start + T, device=x.device)[None, :]
        scores = torch.matmul(q, keys.t()) * self.scale  # [H, T, S]
        scores = scores.masked_fill(~((kpos <= qpos) & (kpos > qpos - o.window)), torch.finfo(scores.dtype).min)
        values = keys
        if o.ratio:
            entries = self.compressor(x, st.comp, rope)
            allowed = torch.arange(entries.shape[0], device=x.device)[None, :] < (qpos + 1) // o.ratio
            if o.kind == "compressed_sparse_attention":
                allowed = self.indexer.visible(x, q_res, st.index, rope, cos, sin, allowed)
            extra = (torch.matmul(q, entries.t()) * self.scale).masked_fill(~allowed, float("-inf"))
            scores, values = torch.cat([scores, extra], dim=-1), torch.cat([keys, entries])
        sinks = self.attn_sink.float().view(-1, 1, 1).expand(-1, T, 1)
        probs = torch.softmax(torch.cat([scores.float(), sinks], dim=-1), dim=-1)[..., :-1]
        out = torch.matmul(probs.to(values.dtype), values).transpose(0, 1)  # [T, H, D]
        out = rope_tail(out, cos[:, None], -sin[:, None])  # undo the rotation V carried
        # commit the state only once the whole step has succeeded
        n_keep = st.window.shape[0]
        if n_keep:
            tail = keys[-n_keep:]
            st.window[: tail.shape[0]] = tail
        st.pos = start + T
        return self.wo_b(self._grouped_out(out.reshape(T, o.o_groups, -1)))

    def _grouped_out(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, G, H*D/G] -> [T, G*R]: group g through its own block of rows of `wo_a`."""
        o, (T, G, _) = self.o, x.shape
        w = self.wo_a.weight
        if isinstance(w, torch.Tensor):  # one batched matmul over the groups (transformers' op order)
            w = w.to(x.dtype).view(G, o.o_lora_rank, -1).transpose(1, 2)  # [G, H*D/G, R]
            return torch.bmm(x.transpose(0, 1), w).transpose(0, 1).reshape(T, -1)
        # a packed weight (a pack's --dense scheme) computes only whole products: every group through
        # all blocks, keeping each group's own block
        y = linear(x.reshape(T * G, -1), w).view(T, G, G, o.o_lora_rank)
        return y.diagonal(dim1=1, dim2=2).transpose(1, 2).reshape(T, -1)
