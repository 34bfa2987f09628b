"""Blocks of the Qwen3-Next / Qwen3.5-MoE hybrid stack, shared by both families.

Three of every four layers mix tokens with a Gated DeltaNet (linear attention with a recurrent
state), the fourth with full softmax attention. The pieces:

- `ZeroCenteredRMSNorm`: scales by (1 + weight), weight stored around 0 (every norm of the stack
  except the DeltaNet's output norm).
- `GatedAttention`: GQA with per-head zero-centred q/k norms, RoPE on the first `rotary_dim` dims
  of each head only, and an output gate: q_proj yields [query | gate] per head and the attention
  output is multiplied by sigmoid(gate) before o_proj.
- `GatedDeltaNet`: a depthwise causal conv (kernel K) with SiLU over [q | k | v], L2-normed q/k, then
  the gated delta rule per value head h with a state S [k_dim, v_dim]:
      S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t / sqrt(k_dim)
  with beta = sigmoid(b) and g = -exp(A_log) * softplus(a + dt_bias); the output is RMS-normed,
  gated by SiLU(z) and projected. Query/key heads are shared by `v_heads / k_heads` value heads.

Its cache (`DeltaNetState`) is the last K-1 conv inputs plus S per head, a fixed size whatever the
context, kept in float32 like the reference. A recurrent state cannot be rewound: it records the
position it has absorbed, a forward must start at 0 (reset) or exactly there, and
`HybridCausalLM.can_resume` tells the generator when a cached prefix may be continued.

Prefill runs the chunked form of the delta rule (chunks of 64: within a chunk the T sequential
updates become one unit-triangular solve and a few matmuls), decode the one-token recurrence, as
transformers' torch path does; both are the same arithmetic up to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_local.experts import ACTIVATIONS
from moe_local.models.base import CausalLM
from moe_local.models.layers import KVCache, Linear, apply_rope, attend_grouped, attention_mask, rms_normalize

CHUNK = 64  # the reference's chunk length for the delta rule


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled by (1 + weight) and only then cast back (Qwen3-Next order)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def gain(self) -> torch.Tensor:
        """The per-channel multiplier (the router look-ahead rescales hidden states by it)."""
        return 1.0 + self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_normalize(x, self.eps) * (1.0 + self.weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    """The DeltaNet output norm: weight * rmsnorm(x), times SiLU(gate) in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = self.weight * rms_normalize(x, self.eps).to(dtype)
        return (h * F.silu(gate.float())).to(dtype)


# --------------------------------------------------------------------------- gated full attention
@dataclass
class GatedAttentionOptions:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int  # RoPE covers head dims [0, rotary_dim) (partial_rotary_factor * head_dim)
    bias: bool = False  # attention_bias: q/k/v/o projections
    rms_eps: float = 1e-6


class GatedAttention(nn.Module):
    def __init__(self, o: GatedAttentionOptions) -> None:
        super().__init__()
        self.o = o
        self.q_proj = Linear(o.hidden, o.heads * o.head_dim * 2, bias=o.bias)
        self.k_proj = Linear(o.hidden, o.kv_heads * o.head_dim, bias=o.bias)
        self.v_proj = Linear(o.hidden, o.kv_heads * o.head_dim, bias=o.bias)
        self.o_proj = Linear(o.heads * o.head_dim, o.hidden, bias=o.bias)
        self.q_norm = ZeroCenteredRMSNorm(o.head_dim, o.rms_eps)
        self.k_norm = ZeroCenteredRMSNorm(o.head_dim, o.rms_eps)
        self.cache: KVCache | None = None

    def setup_cache(self, max_len: int, device, dtype) -> None:
        self.cache = KVCache(self.o.kv_heads, max_len, self.o.head_dim, self.o.head_dim, device, dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = cos.shape[-1]
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)

    def forward(self, x: torch.Tensor, start: int, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        o, T = self.o, x.shape[0]
        q, gate = self.q_proj(x).view(T, o.heads, 2 * o.head_dim).chunk(2, dim=-1)  # per head: [query | gate]
        q = self.q_norm(q).transpose(0, 1)
        k = self.k_norm(self.k_proj(x).view(T, o.kv_heads, o.head_dim)).transpose(0, 1)
        v = self.v_proj(x).view(T, o.kv_heads, o.head_dim).transpose(0, 1)
        cos, sin = rope
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        assert self.cache is not None, "call model.setup_cache() first"
        k, v = self.cache.update(start, k, v)
        out = attend_grouped(q, k, v, attention_mask(start, T, x.device), o.head_dim**-0.5)
        out = out.transpose(0, 1).reshape(T, -1) * torch.sigmoid(gate.reshape(T, -1))
        return self.o_proj(out)


# --------------------------------------------------------------------------- Gated DeltaNet
@dataclass
class DeltaNetOptions:
    hidden: int
    k_heads: int  # linear_num_key_heads
    v_heads: int  # linear_num_value_heads
    k_dim: int  # linear_key_head_dim
    v_dim: int  # linear_value_head_dim
    conv_kernel: int  # linear_conv_kernel_dim
    # Qwen3-Next: in_proj_qkvz / in_proj_ba, grouped per key head; Qwen3.5: in_proj_qkv, _z, _b, _a
    fused_projections: bool
    act: str = "silu"
    rms_eps: float = 1e-6

    @property
    def key_dim(self) -> int:
        return self.k_heads * self.k_dim

    @property
    def value_dim(self) -> int:
        return self.v_heads * self.v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


class DeltaNetState:
    """One layer's recurrent cache: conv inputs [K-1, conv_dim] (model dtype), S [v_heads, k_dim, v_dim]
    (float32), and `pos`, the number of tokens both have absorbed."""

    def __init__(self, o: DeltaNetOptions, device, dtype) -> None:
        self.conv = torch.zeros(o.conv_kernel - 1, o.conv_dim, device=device, dtype=dtype)
        self.recurrent = torch.zeros(o.v_heads, o.k_dim, o.v_dim, device=device, dtype=torch.float32)
        self.pos = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.recurrent))


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def delta_rule_recurrent(q, k, v, g, beta, state):
    """One token at a time. q, k: [h, T, dk]; v: [h, T, dv]; g, beta: [h, T] (float32, q already scaled);
    state [h, dk, dv]. Returns outputs [h, T, dv] and the new state."""
    out = torch.empty_like(v)
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[:, None, None]
        kt = k[:, t]
        remembered = torch.einsum("hkv,hk->hv", state, kt)  # what S already predicts for k_t
        update = (v[:, t] - remembered) * beta[:, t, None]
        state = state + kt[:, :, None] * update[:, None, :]
        out[:, t] = torch.einsum("hkv,hk->hv", state, q[:, t])
    return out, state


def delta_rule_chunked(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The same recurrence, `chunk` tokens per step. Shapes as `delta_rule_recurrent`.

    Within a chunk, with G_i the cumulative log decay up to token i and D_ij = exp(G_i - G_j) (j <= i),
    the written values u_i = beta_i (v_i - exp(G_i) S0^T k_i - sum_{j<i} D_ij (k_i . k_j) u_j) solve
    (I + A) U = beta V - beta exp(G) K S0 with A strictly lower triangular, A_ij = beta_i D_ij k_i . k_j.
    Then o_i = exp(G_i) S0^T q_i + sum_{j<=i} D_ij (q_i . k_j) u_j and the state leaving the chunk is
    exp(G_C) S0 + sum_j exp(G_C - G_j) k_j u_j^T. The triangular solves of all chunks run at once;
    only the state is carried chunk to chunk. Zero padding (g = beta = 0) writes nothing.
    """
    h, T, dk = k.shape
    dv = v.shape[-1]
    pad = (-T) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n = (T + pad) // chunk
    q, k, v = (t.reshape(h, n, chunk, -1) for t in (q, k, v))
    g, beta = g.reshape(h, n, chunk), beta.reshape(h, n, chunk)
    G = g.cumsum(-1)  # [h, n, c]
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    D = (G[..., :, None] - G[..., None, :]).masked_fill(future, float("-inf")).exp()  # [h, n, c, c], 0 above
    kb = k * beta[..., None]
    A = torch.tril(kb @ k.transpose(-1, -2) * D, -1)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    rhs = torch.cat([v * beta[..., None], kb * G.exp()[..., None]], dim=-1)  # [h, n, c, dv + dk]
    solved = torch.linalg.solve_triangular(A + eye, rhs, upper=False)
    u_v, u_k = solved[..., :dv], solved[..., dv:]  # U = u_v - u_k @ S0
    scores = q @ k.transpose(-1, -2) * D  # [h, n, c, c], causal within the chunk
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()  # [h, n]
    out = torch.empty(h, n, chunk, dv, dtype=q.dtype, device=q.device)
    for i in range(n):
        u = u_v[:, i] - u_k[:, i] @ state
        out[:, i] = q_decayed[:, i] @ state + scores[:, i] @ u
        state = state * chunk_decay[:, i, None, None] + k_to_end[:, i].transpose(-1, -2) @ u
    return out.reshape(h, n * chunk, dv)[:, :T], state


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer; parameter names follow the checkpoints (`linear_attn.*`)."""

    def __init__(self, o: DeltaNetOptions) -> None:
        super().__init__()
        self.o = o
        if o.fused_projections:
            self.in_proj_qkvz = Linear(o.hidden, 2 * o.key_dim + 2 * o.value_dim, bias=False)
            self.in_proj_ba = Linear(o.hidden, 2 * o.v_heads, bias=False)
        else:
            self.in_proj_qkv = Linear(o.hidden, o.conv_dim, bias=False)
            self.in_proj_z = Linear(o.hidden, o.value_dim, bias=False)
            self.in_proj_b = Linear(o.hidden, o.v_heads, bias=False)
            self.in_proj_a = Linear(o.hidden, o.v_heads, bias=False)
        self.conv1d = nn.Conv1d(o.conv_dim, o.conv_dim, o.conv_kernel, groups=o.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(o.v_heads))
        self.A_log = nn.Parameter(torch.zeros(o.v_heads))
        self.norm = GatedRMSNorm(o.v_dim, o.rms_eps)
        self.out_proj = Linear(o.value_dim, o.hidden, bias=False)
        self.act = ACTIVATIONS[o.act]
        self.cache: DeltaNetState | None = None

    def setup_cache(self, max_len: int, device, dtype) -> None:
        self.cache = DeltaNetState(self.o, device, dtype)

    def _project(self, x: torch.Tensor):
        """(conv input [T, q|k|v], z [T, v_heads, v_dim], b [T, v_heads], a [T, v_heads])."""
        o, T = self.o, x.shape[0]
        if not o.fused_projections:
            return (self.in_proj_qkv(x), self.in_proj_z(x).view(T, o.v_heads, o.v_dim),
                    self.in_proj_b(x), self.in_proj_a(x))
        # Qwen3-Next groups the outputs per key head: [q_h | k_h | v of its r value heads | z of them]
        r = o.v_heads // o.k_heads
        q, k, v, z = self.in_proj_qkvz(x).view(T, o.k_heads, -1).split([o.k_dim, o.k_dim, r * o.v_dim, r * o.v_dim], -1)
        b, a = self.in_proj_ba(x).view(T, o.k_heads, 2 * r).split([r, r], -1)
        qkv = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=-1)
        return qkv, z.reshape(T, o.v_heads, o.v_dim), b.reshape(T, o.v_heads), a.reshape(T, o.v_heads)

    def forward(self, x: torch.Tensor, start: int, rope=None) -> torch.Tensor:
        o, T = self.o, x.shape[0]
        st = self.cache
        assert st is not None, "call model.setup_cache() first"
        if start == 0:
            conv_prev, state = torch.zeros_like(st.conv), torch.zeros_like(st.recurrent)
        elif start == st.pos:
            conv_prev, state = st.conv, st.recurrent
        else:
            raise ValueError(f"the recurrent state holds {st.pos} tokens; it cannot continue at position {start}")
        qkv, z, b, a = self._project(x)
        window = torch.cat([conv_prev, qkv], dim=0)  # the K-1 inputs before this forward, then its T
        w = self.conv1d.weight  # [C, 1, K]
        mixed = self.act(F.conv1d(window.t()[None].to(w.dtype), w, groups=o.conv_dim)[0]).t().to(x.dtype)
        q, k, v = mixed.split([o.key_dim, o.key_dim, o.value_dim], dim=-1)
        r = o.v_heads // o.k_heads
        q, k = (t.reshape(T, o.k_heads, o.k_dim).repeat_interleave(r, dim=1) for t in (q, k))
        q, k, v = (t.reshape(T, o.v_heads, -1).transpose(0, 1).float() for t in (q, k, v))  # [h, T, d]
        q, k = l2norm(q) * o.k_dim**-0.5, l2norm(k)
        beta = torch.sigmoid(b).t().float()
        g = (-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)).t()  # [h, T], log decay <= 0
        rule = delta_rule_recurrent if T == 1 and start > 0 else delta_rule_chunked
        out, state = rule(q, k, v, g, beta, state)
        # commit only once the whole step has succeeded: an interrupted forward leaves pos unchanged
        st.conv.copy_(window[window.shape[0] - st.conv.shape[0]:])
        st.recurrent.copy_(state)
        st.pos = start + T
        out = self.norm(out.transpose(0, 1).to(x.dtype).reshape(-1, o.v_dim), z.reshape(-1, o.v_dim))
        return self.out_proj(out.reshape(T, o.value_dim))


class HybridCausalLM(CausalLM):
    """A CausalLM whose linear-attention layers carry recurrent state."""

    def can_resume(self, start: int) -> bool:
        return all(layer.mixer.cache is not None and layer.mixer.cache.pos == start
                   for layer in self.model.layers if isinstance(layer.mixer, GatedDeltaNet))
