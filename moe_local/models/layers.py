"""Building blocks shared by every family: norms, rotary embeddings, attention with a KV cache,
dense SwiGLU MLPs and the sparse MoE block.

Module and parameter names follow the Hugging Face checkpoints (`self_attn.q_proj`, `mlp.gate`...)
so that loading is a name-for-name copy. Everything is batch-1: activations are `[T, hidden]`.
The arithmetic mirrors `transformers`' eager implementations (same op order, norms in float32)
so that logits match it to ~1e-6 in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moe_local.errors import ConfigError
from moe_local.experts import ACTIVATIONS, ExpertProvider
from moe_local.models.config_values import check_config_value
from moe_local.formats.compute import linear
from moe_local.formats.schemes import PackedWeight


class Linear(nn.Linear):
    """nn.Linear whose matmul is `formats.compute.linear`, the one entry point every weight goes through.

    `weight` stays in the dtype it was loaded in (a bf16 checkpoint's bf16, not a float32 copy) or is
    a `PackedWeight` (a pack's `--dense int8|int4` tensor, set by `models.load_weights`); the
    activations keep the run dtype. Parameter names are nn.Linear's, so checkpoints load name for name.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """Token embeddings held at their storage dtype (or packed): only the gathered rows are cast.

    A packed table is gathered row-wise from its packed tensors (a scheme's row range is a row range
    of every packed tensor) and only those rows are dequantized, so the table is never expanded."""

    def forward(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.weight
        if isinstance(w, PackedWeight):
            rows = {k: v.index_select(0, ids) for k, v in w.packed.items()}
            out = w.scheme.dequantize(rows, (ids.shape[0], w.shape[1]))
        else:
            out = F.embedding(ids, w)
        return out if dtype is None else out.to(dtype)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """`x * rsqrt(mean(x^2) + eps)` over the last dim, in float32: the step every RMSNorm variant shares.

    One fused op instead of five (float, pow, mean, add, rsqrt, mul): a decode token runs ~25 norms
    on vectors of a few thousand floats, where each op's dispatch costs more than its arithmetic.
    Bitwise the same as the five-op form (tests/test_qwen_olmoe.py checks every variant against transformers)."""
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps)


class RMSNorm(nn.Module):
    """weight * normalize(x) cast back to x's dtype (the Llama / Qwen / Mixtral order)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == torch.float32 and w.dtype == torch.float32:  # the cast back is a no-op: one op in all
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return w * rms_normalize(x, self.eps).to(x.dtype)


# --------------------------------------------------------------------------- rotary embeddings
@dataclass
class RopeConfig:
    """The rotary-embedding settings of config.json, old (`rope_scaling`) or new (`rope_parameters`) style."""

    dim: int
    theta: float = 10000.0
    kind: str = "default"  # default | linear | yarn
    factor: float = 1.0
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # explicit cos/sin scale; YaRN infers it from factor/mscale otherwise
    truncate: bool = True  # YaRN: round the correction range to whole dims (transformers' default)

    KINDS: ClassVar[tuple[str, ...]] = ("default", "linear", "yarn")

    @classmethod
    def from_config(cls, cfg: dict, dim: int) -> "RopeConfig":
        """Read (and check: type, range, known kind) the rotary settings, naming the key on failure."""
        for key in ("rope_parameters", "rope_scaling"):
            check_config_value(key, cfg.get(key), dict | None)
        params = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        params = {**scaling, **params}
        hints = {"rope_theta": float, "factor": float | None, "original_max_position_embeddings": int | None,
                 "beta_fast": float | None, "beta_slow": float | None, "mscale": float | None,
                 "mscale_all_dim": float | None, "attention_factor": float | None, "truncate": bool,
                 "rope_type": str | None, "type": str | None}
        positive = ("rope_theta", "factor", "original_max_position_embeddings")
        for key, hint in hints.items():
            if key in params:
                params[key] = check_config_value(f"rope_parameters.{key}", params[key], hint, key in positive)
        for key in ("rope_theta", "original_max_position_embeddings"):
            if key in cfg:
                check_config_value(key, cfg[key], hints[key], True)
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        if kind not in cls.KINDS:
            raise ConfigError(f"config.json: rope type {kind!r} is not supported (supported: {', '.join(cls.KINDS)})")
        # As transformers' standardize_rope_params: a top-level original_max_position_embeddings
        # wins, else the rope dict's, else max_position_embeddings (never the cache length).
        original = cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
            or cfg.get("max_position_embeddings")
        factor = params.get("factor")
        if factor is None:
            # DeepSeek-style configs may omit factor: it is the context extension ratio
            factor = cfg["max_position_embeddings"] / original if kind == "yarn" and original else 1.0
        return cls(
            dim=dim,
            theta=float(theta),
            kind=kind,
            factor=float(factor),
            original_max_position=original,
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(rope: RopeConfig, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale ("attention factor") for a rope kind."""
    dim = rope.dim
    base = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    inv_freq = 1.0 / base
    if rope.kind in ("default", None):
        return inv_freq, 1.0
    if rope.kind == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.kind == "yarn":
        # Mirrors transformers' _compute_yarn_parameters op for op (so the tables agree to the last bit).
        factor = rope.factor
        original = rope.original_max_position or max_position
        attention_factor = rope.attention_factor
        if attention_factor is None:
            if rope.mscale and rope.mscale_all_dim:
                attention_factor = yarn_get_mscale(factor, rope.mscale) / yarn_get_mscale(factor, rope.mscale_all_dim)
            else:
                attention_factor = yarn_get_mscale(factor)

        def correction_dim(num_rotations: float) -> float:
            return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1.0 - ramp
        pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq, float(attention_factor)
    raise ValueError(f"unsupported rope type {rope.kind!r}")


class Rope:
    """Precomputed cos/sin tables for positions [0, max_len); not a module (nothing to load)."""

    def __init__(self, rope: RopeConfig, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq, scale = rope_inv_freq(rope, max_len)
        t = torch.arange(max_len, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scale).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * scale).to(device=device, dtype=dtype)

    def __call__(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[start : start + length], self.sin[start : start + length]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, T, d]; cos/sin: [T, d]."""
    return x * cos + rotate_half(x) * sin


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Partial rotary (GLM-4.5's, MiniMax-M2's `partial_rotary_factor`): rotate the first r = cos.shape[-1]
    dims of each head (rotate_half within them), pass the rest through; r = d is plain `apply_rope`."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)


def attention_mask(start: int, length: int, device: torch.device, window: int | None = None) -> torch.Tensor | None:
    """Boolean [length, start+length]: query i (at position start+i) may see key j.

    None when every key is visible: a decode step (one query, the last position) inside its window.
    That is every generated token, so it skips building and applying a mask that changes nothing."""
    if length == 1 and (window is None or start < window):
        return None
    q = torch.arange(start, start + length, device=device)[:, None]
    k = torch.arange(start + length, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def apply_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden keys get the dtype's minimum score (as the reference does, not -inf); None hides nothing."""
    return scores if mask is None else scores.masked_fill(~mask, torch.finfo(scores.dtype).min)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           sink: torch.Tensor | None = None) -> torch.Tensor:
    """Eager softmax attention, softmax in float32 like the reference. q: [h, T, d]; k, v: [h, S, d].

    `sink` ([h, 1, 1] or [h, T, 1]): an attention sink (gpt-oss), one learned logit per head that
    joins every query's softmax as an extra key with no value, so a head can attend to "nothing"."""
    scores = apply_mask(torch.matmul(q, k.transpose(-1, -2)) * scale, mask)
    if sink is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)
    # as transformers' gpt_oss eager_attention_forward: append the sink, subtract the row max, drop it
    logits = torch.cat((scores, sink.to(scores.dtype).expand(-1, scores.shape[1], 1)), dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1].to(v.dtype)
    return torch.matmul(probs, v)


def attend_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query attention without copying the KV cache per query head.

    q: [heads, T, d]; k, v: [kv_heads, S, d]. The query heads sharing one KV head (heads are
    kv-major, as repeat_kv lays them out) are folded into the query axis, so every KV head is read
    once instead of being repeated `heads / kv_heads` times: at long contexts that copy dominated
    decode time on CPU. `sinks` [heads]: one sink logit per query head (see `attend`).
    """
    heads, T, d = q.shape
    kv_heads = k.shape[0]
    groups = heads // kv_heads
    sink = None if sinks is None else sinks.reshape(heads, 1, 1)
    if groups == 1:
        return attend(q, k, v, mask, scale, sink)
    q = q.reshape(kv_heads, groups * T, d)
    if mask is not None:
        mask = mask.repeat(groups, 1)
    if sink is not None:  # folded query rows are head-major: each head's sink repeats over its T rows
        sink = sink.expand(heads, T, 1).reshape(kv_heads, groups * T, 1)
    out = attend(q, k, v, mask, scale, sink)
    return out.reshape(heads, T, -1)


class KVCache:
    """Preallocated keys and values for one attention layer, batch 1: [heads, max_len, dim]."""

    def __init__(self, heads: int, max_len: int, k_dim: int, v_dim: int, device, dtype) -> None:
        self.k = torch.zeros(heads, max_len, k_dim, device=device, dtype=dtype)
        self.v = torch.zeros(heads, max_len, v_dim, device=device, dtype=dtype)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


@dataclass
class AttentionOptions:
    """The ways standard multi-head attention differs between families."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False  # Qwen3-MoE / OLMoE `attention_bias` also puts a bias on o_proj
    qk_norm: str | None = None  # None | "head" (Qwen3: per head, before RoPE) | "full" (OLMoE: whole projection)
    clip_qkv: float | None = None  # applied after a "full" qk_norm, as OLMoE does
    sliding_window: int | None = None
    rms_eps: float = 1e-6
    sinks: bool = False  # gpt-oss: a learned per-head sink logit in every softmax (`self_attn.sinks`)


class Attention(nn.Module):
    """Grouped-query attention with RoPE and a preallocated KV cache."""

    def __init__(self, o: AttentionOptions) -> None:
        super().__init__()
        self.o = o
        self.q_proj = Linear(o.hidden, o.heads * o.head_dim, bias=o.qkv_bias)
        self.k_proj = Linear(o.hidden, o.kv_heads * o.head_dim, bias=o.qkv_bias)
        self.v_proj = Linear(o.hidden, o.kv_heads * o.head_dim, bias=o.qkv_bias)
        self.o_proj = Linear(o.heads * o.head_dim, o.hidden, bias=o.o_bias)
        if o.qk_norm == "head":
            self.q_norm = RMSNorm(o.head_dim, o.rms_eps)
            self.k_norm = RMSNorm(o.head_dim, o.rms_eps)
        elif o.qk_norm == "full":
            self.q_norm = RMSNorm(o.heads * o.head_dim, o.rms_eps)
            self.k_norm = RMSNorm(o.kv_heads * o.head_dim, o.rms_eps)
        if o.sinks:
            self.sinks = nn.Parameter(torch.empty(o.heads))
        self.cache: KVCache | None = None

    def setup_cache(self, max_len: int, device, dtype) -> None:
        self.cache = KVCache(self.o.kv_heads, max_len, self.o.head_dim, self.o.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, start: int, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        o, T = self.o, x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if o.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if o.clip_qkv is not None:
            q, k, v = (t.clamp(-o.clip_qkv, o.clip_qkv) for t in (q, k, v))
        q = q.view(T, o.heads, o.head_dim)
        k = k.view(T, o.kv_heads, o.head_dim)
        if o.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 1), k.transpose(0, 1)
        v = v.view(T, o.kv_heads, o.head_dim).transpose(0, 1)
        cos, sin = rope  # narrower than head_dim under partial rotary (the family's rope_config says so)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        assert self.cache is not None, "call model.setup_cache() first"
        k, v = self.cache.update(start, k, v)
        mask = attention_mask(start, T, x.device, o.sliding_window)
        out = attend_grouped(q, k, v, mask, o.head_dim**-0.5, self.sinks if o.sinks else None)
        return self.o_proj(out.transpose(0, 1).reshape(T, -1))


class MLP(nn.Module):
    """Dense SwiGLU MLP (dense layers, shared experts)."""

    def __init__(self, hidden: int, inter: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """The gate of an MoE layer: a linear map to expert logits and a family-specific top-k rule.

    `select(logits_input) -> (ids [T, k], weights [T, k])`. Kept as a module of its own so the
    cache can apply later layers' routers to the current hidden state to predict their experts.
    """

    def __init__(self, hidden: int, num_experts: int, rule: Callable[["Router", torch.Tensor], tuple],
                 cast_weights: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.rule = rule
        # Qwen-MoE / OLMoE cast the float32 top-k weights to the hidden dtype before scaling expert
        # outputs (Mixtral does not); in bf16 this changes the sums, so it is a per-family switch.
        self.cast_weights = cast_weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self.rule(self, x)
        return ids, (weights.to(x.dtype) if self.cast_weights else weights)

    def selection_scores(self, x: torch.Tensor) -> torch.Tensor:
        """[T, E] float32 scores whose order is the order the rule picks experts in (the router
        look-ahead ranks its spare predictions by them): the logits, softmax being monotonic."""
        return linear(x, self.weight).float()


class ExpertsHandle:
    """Plain (non-module) holder so the provider is never registered as model parameters."""

    def __init__(self) -> None:
        self.provider: ExpertProvider | None = None


class SparseMoE(nn.Module):
    """Route, run the routed experts through the provider, add shared experts if any."""

    def __init__(
        self,
        layer: int,
        router: Router,
        handle: ExpertsHandle,
        shared: nn.Module | None = None,
        shared_name: str = "shared_experts",
        shared_gate: bool = False,
        hidden: int = 0,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.gate = router
        self.handle = handle
        self.shared_name = shared_name if shared is not None else None
        if shared is not None:
            setattr(self, shared_name, shared)
        self.shared_expert_gate = Linear(hidden, 1, bias=False) if shared_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        provider = self.handle.provider
        assert provider is not None, "no expert provider attached (see moe_local.runtime.load_model)"
        y = provider.forward(self.layer, x, ids, weights)
        if self.shared_name is not None:
            shared = getattr(self, self.shared_name)(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y
