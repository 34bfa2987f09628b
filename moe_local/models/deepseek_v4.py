"""DeepSeek-V4 (V4-Flash, V4-Pro): compressed attention, hyper-connection residual, hash-routed MoE.

- Attention (`csa.py`): shared-KV MQA over a sliding window; per `layer_types` (or the hub's
  `compress_ratios` 0 / 4 / 128) plain sliding, compressed-sparse (CSA: overlapping 4-token entries
  picked per query by a lightning indexer) or heavily-compressed (HCA: 128-token entries). Sliding
  layers rotate with `rope_theta`; compressed ones with `compress_rope_theta` and the YaRN settings.
- Residual (`hyper.py`): `hc_mult` streams mixed around each block by Sinkhorn-projected weights.
- MoE in every layer: `n_routed_experts` experts, top-`num_experts_per_tok`, one shared expert, all
  with the clamped SwiGLU (`swiglu_limit`). Scores are `scoring_func` (sqrtsoftplus, sigmoid or
  softmax) of the router logits; the first `num_hash_layers` layers (`mlp_layer_types` "hash_moe")
  pick their experts from the token id by a frozen table (`gate.tid2eid`), the others by top-k of
  score + `gate.bias` (selection only). Weights are the chosen scores, renormalised except under
  softmax (the reference inference code's rule; transformers has no softmax scoring), times
  `routed_scaling_factor`.
- Hash layers' experts are known from the token ids before the forward reaches them: their routers
  are `exact`, so the look-ahead predicts them exactly, also at their own attention input (see
  models/lookahead.py) where the expert cache has room to load them even at its smallest budget.

Checkpoint names, in two layouts (this family's whole name map, `checkpoint_map`): what transformers
saves (`model.layers.{l}.attn.wq_a.weight`, `model.embed_tokens.weight`, `model.hc_head.hc_fn`,
`head.weight`) and the hub's original one (`layers.{l}.attn.wq_a.weight`, `embed.weight`,
`hc_head_fn`, `norm.weight`, `head.weight`); per layer `attn.{wq_a, q_norm, wq_b, wkv, norm, wo_a,
wo_b, attn_sink}`, `attn.compressor.{wkv, wgate, ape, norm}`, `attn.indexer.{wq_b, weights_proj,
compressor.*}`, `attn_norm`, `ffn_norm`, `hc_{attn,ffn}_{fn,base,scale}`, `ffn.gate.{weight, bias,
tid2eid}`, `ffn.shared_experts.{w1,w2,w3}`, experts `ffn.experts.{e}.{w1,w3,w2}` (or fused). The hub
checkpoints store linears as FP8 (e4m3, 128x128 ue8m0 scales in `<name>.scale`) and routed experts
as FP4 (e2m1 pairs in int8, one ue8m0 scale per 32): `loading.Checkpoint` dequantizes both. The
multi-token-prediction module (`mtp.*`) is not run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moe_local.errors import ConfigError
from moe_local.experts import LimitedSwiGLU
from moe_local.loading.checkpoint_map import CheckpointMap
from moe_local.models.base import CausalLM, ModelArgs, Tap
from moe_local.models.csa import KINDS, Fp32RMSNorm, RopeTable, V4Attention, V4AttentionOptions
from moe_local.models.hyper import hc_collapse, hc_expand, hc_weights
from moe_local.models.layers import Linear, RopeConfig, Router, SparseMoE, rope_inv_freq

_RATIO_KIND = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
MLP_KINDS = ("hash_moe", "moe")
SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sqrtsoftplus": lambda logits: F.softplus(logits).sqrt(),
    "sigmoid": torch.sigmoid,
    "softmax": lambda logits: logits.softmax(dim=-1),
}


@dataclass
class DeepseekV4Args(ModelArgs):
    # transformers' DeepseekV4Config defaults (V4-Flash), used only when config.json omits a key
    intermediate_size: int = 0  # V4 has only moe_intermediate_size
    num_key_value_heads: int = 1
    head_dim: int | None = 512
    q_lora_rank: int = 1024
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    layer_types: list[str] | None = None
    compress_ratios: list[int] | None = None  # the hub's spelling of layer_types (0 / 4 / 128 per layer)
    compress_rates: dict | None = None
    mlp_layer_types: list[str] | None = None
    num_hash_layers: int = 3
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    partial_rotary_factor: float | None = None
    qk_rope_head_dim: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    num_nextn_predict_layers: int = 0
    aliases: ClassVar[dict[str, str]] = {"n_routed_experts": "num_experts"}
    required: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "moe_intermediate_size")
    positive: ClassVar[tuple[str, ...]] = ModelArgs.positive + (
        "moe_intermediate_size", "q_lora_rank", "hc_mult", "hc_sinkhorn_iters", "sliding_window", "o_groups",
        "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk", "swiglu_limit")

    def __post_init_args__(self) -> None:
        super().__post_init_args__()
        n = self.num_hidden_layers
        self.intermediate_size = self.moe_intermediate_size
        if self.attention_bias or self.mlp_bias:
            raise ConfigError("config.json sets attention_bias / mlp_bias, which deepseek_v4 has not")
        if self.num_key_value_heads != 1:
            raise ConfigError(f"config.json: deepseek_v4 shares one key/value head; num_key_value_heads="
                              f"{self.num_key_value_heads}")
        if self.n_shared_experts != 1:
            raise ConfigError(f"config.json: n_shared_experts={self.n_shared_experts}; deepseek_v4 has one shared expert")
        if self.scoring_func not in SCORES:
            raise ConfigError(f"config.json: scoring_func {self.scoring_func!r} is not one of {', '.join(SCORES)}")
        if self.layer_types is None:
            ratios = self.compress_ratios
            if ratios is None:  # transformers' default schedule: 2 HCA, then CSA / HCA alternating
                self.layer_types = (["heavily_compressed_attention"] * min(n, 2) +
                                    [KINDS[1] if i % 2 else KINDS[2] for i in range(max(n - 2, 0))])
            else:
                bad = [r for r in ratios if r not in _RATIO_KIND]
                if bad:
                    raise ConfigError(f"config.json: compress_ratios must be 0, 4 or 128, got {bad}")
                self.layer_types = [_RATIO_KIND[r] for r in ratios]
        self.layer_types = list(self.layer_types)[:n]  # the hub lists the MTP layers' too
        if self.mlp_layer_types is None:
            h = self.num_hash_layers
            self.mlp_layer_types = ["hash_moe"] * min(n, h) + ["moe"] * max(0, n - h)
        self.mlp_layer_types = list(self.mlp_layer_types)[:n]
        for key, values, allowed in (("layer_types", self.layer_types, KINDS),
                                     ("mlp_layer_types", self.mlp_layer_types, MLP_KINDS)):
            if len(values) != n or any(v not in allowed for v in values):
                raise ConfigError(f"config.json: {key} must name one of {', '.join(allowed)} for each of the {n} layers")
        rates = {KINDS[1]: 4, KINDS[2]: 128, **(self.raw.get("compress_rates") or {})}
        for legacy, kind in (("compress_rate_csa", KINDS[1]), ("compress_rate_hca", KINDS[2])):
            if self.raw.get(legacy) is not None:
                rates[kind] = self.raw[legacy]
        self.compress_rates = rates
        if self.partial_rotary_factor is None:
            rope = self.qk_rope_head_dim if self.qk_rope_head_dim is not None else 64
            self.partial_rotary_factor = rope / self.head_dim
        if not 0 < self.rope_dim <= self.head_dim or self.rope_dim % 2:
            raise ConfigError(f"config.json: {self.rope_dim} rotary dims of head_dim={self.head_dim}; need an even "
                              f"number in 2..{self.head_dim}")
        if self.num_attention_heads % self.o_groups:
            raise ConfigError(f"config.json: o_groups={self.o_groups} does not divide num_attention_heads="
                              f"{self.num_attention_heads}")

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def expert_act(self) -> LimitedSwiGLU:
        return LimitedSwiGLU(limit=float(self.swiglu_limit))

    def is_hash_layer(self, layer: int) -> bool:
        return self.mlp_layer_types[layer] == "hash_moe"

    def rope_configs(self) -> dict[str, RopeConfig]:
        """The two rotary bases, as transformers derives them: "main" (sliding layers) plain RoPE with
        rope_theta; "compress" (compressed layers and their compressors) compress_rope_theta with
        the config's scaling (YaRN in the releases), its cos/sin scale forced to 1 as the reference has it."""
        params = self.raw.get("rope_parameters") or {}
        if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
            nested = {"main": params["main"], "compress": params["compress"]}
        else:
            scaling = {**(self.raw.get("rope_scaling") or {}), **params}
            compress = {k: v for k, v in scaling.items() if k not in ("main", "compress")}
            compress["rope_theta"] = self.compress_rope_theta
            compress["rope_type"] = compress.get("rope_type", compress.get("type", "default"))
            if compress["rope_type"] == "yarn":
                compress.setdefault("attention_factor", 1.0)
            nested = {"main": {"rope_type": "default", "rope_theta": self.rope_theta}, "compress": compress}
        out = {}
        for name, p in nested.items():
            kind = p.get("rope_type", p.get("type", "default")) or "default"
            original = p.get("original_max_position_embeddings") or self.max_position_embeddings
            out[name] = RopeConfig(
                dim=int(self.head_dim * p.get("partial_rotary_factor", self.partial_rotary_factor)),
                theta=float(p.get("rope_theta", self.rope_theta)), kind=kind, factor=float(p.get("factor") or 1.0),
                original_max_position=original, beta_fast=float(p.get("beta_fast") or 32.0),
                beta_slow=float(p.get("beta_slow") or 1.0), mscale=p.get("mscale"),
                mscale_all_dim=p.get("mscale_all_dim"), attention_factor=p.get("attention_factor"))
        return out

    def attention_options(self, layer: int) -> V4AttentionOptions:
        kind = self.layer_types[layer]
        return V4AttentionOptions(
            hidden=self.hidden_size, heads=self.num_attention_heads, head_dim=self.head_dim, rope_dim=self.rope_dim,
            q_lora_rank=self.q_lora_rank, o_groups=self.o_groups, o_lora_rank=self.o_lora_rank,
            window=self.sliding_window, kind=kind, ratio=int(self.compress_rates.get(kind, 0)),
            index_heads=self.index_n_heads, index_head_dim=self.index_head_dim, index_topk=self.index_topk,
            eps=self.rms_norm_eps)


# --------------------------------------------------------------------------- MoE
class TokenIds:
    """Plain (non-module) holder of the ids of the tokens being run: the model sets it at the start of
    each forward, the hash routers (and through them the look-ahead) read it."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None


def _weigh(scores: torch.Tensor, ids: torch.Tensor, normalize: bool, scale: float) -> torch.Tensor:
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale


class V4Router(Router):
    """Top-k of score + `bias` (checkpoint `ffn.gate.bias`, float32, selection only)."""

    def __init__(self, a: DeepseekV4Args) -> None:
        score, k, scale = SCORES[a.scoring_func], a.num_experts_per_tok, a.routed_scaling_factor
        normalize = a.scoring_func != "softmax"

        def rule(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            scores = score(F.linear(x.float(), router.weight.float()))
            ids = torch.topk(scores + router.bias.float(), k, dim=-1, sorted=False).indices
            return ids, _weigh(scores, ids, normalize, scale)

        super().__init__(a.hidden_size, a.num_experts, rule)
        self.score = score
        self.bias = nn.Parameter(torch.zeros(a.num_experts), requires_grad=False)

    def selection_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(super().selection_scores(x)) + self.bias.float()


class HashRouter(Router):
    """Experts from the token id (`ffn.gate.tid2eid` [vocab, top_k]); weights from the learned gate.
    `exact`: the choice does not depend on the hidden state, so the look-ahead knows it for sure."""

    exact = True

    def __init__(self, a: DeepseekV4Args, tokens: TokenIds) -> None:
        score, scale = SCORES[a.scoring_func], a.routed_scaling_factor
        normalize = a.scoring_func != "softmax"

        def rule(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ids = router.tid2eid[router.tokens.ids].long()
            if ids.shape[0] != x.shape[0]:
                raise ValueError(f"hash routing of {x.shape[0]} rows with {ids.shape[0]} token ids")
            return ids, _weigh(score(F.linear(x.float(), router.weight.float())), ids, normalize, scale)

        super().__init__(a.hidden_size, a.num_experts, rule)
        self.tokens = tokens
        self.tid2eid = nn.Parameter(torch.zeros(a.vocab_size, a.num_experts_per_tok, dtype=torch.long),
                                    requires_grad=False)


class LimitedMLP(nn.Module):
    """The shared expert: w2(silu(min(w1 x, limit)) * clamp(w3 x, -limit, limit))."""

    def __init__(self, hidden: int, inter: int, limit: float) -> None:
        super().__init__()
        self.w1 = Linear(hidden, inter, bias=False)
        self.w2 = Linear(inter, hidden, bias=False)
        self.w3 = Linear(hidden, inter, bias=False)
        self.act = LimitedSwiGLU(limit=limit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act.combine(self.w1(x), self.w3(x)))


# --------------------------------------------------------------------------- decoder
class V4DecoderLayer(nn.Module):
    """Attention and MoE blocks, each between a hyper-connection collapse and expand."""

    def __init__(self, a: DeepseekV4Args, layer: int, attn: V4Attention, ffn: SparseMoE) -> None:
        super().__init__()
        self.a = a
        self.attn, self.ffn = attn, ffn
        self.attn_norm = Fp32RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.ffn_norm = Fp32RMSNorm(a.hidden_size, a.rms_norm_eps)
        n = a.hc_mult
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.zeros((2 + n) * n, n * a.hidden_size)))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.zeros((2 + n) * n)))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.ones(3)))

    # the names the shared machinery (look-ahead, cache setup) knows blocks and norms by
    @property
    def mixer(self) -> V4Attention:
        return self.attn

    @property
    def input_layernorm(self) -> Fp32RMSNorm:
        return self.attn_norm

    @property
    def post_attention_layernorm(self) -> Fp32RMSNorm:
        return self.ffn_norm

    def _mix(self, site: str, streams: torch.Tensor):
        a = self.a
        return hc_weights(streams, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                          getattr(self, f"hc_{site}_scale"), a.hc_sinkhorn_iters, a.hc_eps, a.rms_norm_eps)

    def forward(self, streams: torch.Tensor, start: int, ropes, tap: Tap | None = None) -> torch.Tensor:
        post, comb, x = self._mix("attn", streams)
        h = self.attn_norm(x)
        if tap is not None:
            tap("attn", h)
        streams = hc_expand(streams, self.attn(h, start, ropes), post, comb)
        post, comb, x = self._mix("ffn", streams)
        h = self.ffn_norm(x)
        if tap is not None:
            tap("mlp", h)
        return hc_expand(streams, self.ffn(h), post, comb)


class HyperHead(nn.Module):
    def __init__(self, a: DeepseekV4Args) -> None:
        super().__init__()
        n = a.hc_mult
        self.hc_fn = nn.Parameter(torch.zeros(n, n * a.hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(n))
        self.hc_scale = nn.Parameter(torch.ones(1))


_FP32 = ("attn_sink", "ape", "gate.bias", "q_norm.weight", "norm.weight", "attn_norm.weight", "ffn_norm.weight",
         "hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale",
         "hc_fn", "hc_base", "hc_scale")
_HUB_NAMES = (("model.embed_tokens.", "embed."), ("model.norm.", "norm."), ("model.hc_head.hc_", "hc_head_"),
              ("model.layers.", "layers."), ("lm_head.", "head."))


class DeepseekV4(CausalLM):
    family = "deepseek_v4"
    Args = DeepseekV4Args
    Norm = Fp32RMSNorm
    checkpoint_map = CheckpointMap(
        experts="model.layers.{layer}.ffn.experts", projections=("w1", "w3", "w2"),
        keep_fp32=_FP32, ignored=(r".*\.rotary_emb\.", r"mtp\."),
        layouts=((("lm_head.", "head."),), _HUB_NAMES),  # as transformers saves it; as the hub ships it
    )

    def __init__(self, args: DeepseekV4Args) -> None:
        self.tokens = TokenIds()
        super().__init__(args)
        self.model.hc_head = HyperHead(args)

    def make_layer(self, i: int) -> V4DecoderLayer:
        a = self.args
        router = HashRouter(a, self.tokens) if a.is_hash_layer(i) else V4Router(a)
        shared = LimitedMLP(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts, a.swiglu_limit)
        ffn = SparseMoE(i, router, self.experts, shared=shared, shared_name="shared_experts")
        return V4DecoderLayer(a, i, V4Attention(a.attention_options(i)), ffn)

    def make_rope(self, max_len: int, device, dtype) -> dict[str, RopeTable]:
        out = {}
        for name, cfg in self.args.rope_configs().items():
            inv_freq, scale = rope_inv_freq(cfg, max_len)
            out[name] = RopeTable(inv_freq, scale, max(max_len, 1), device, dtype)
        return out

    def notes(self) -> list[str]:
        return ["the multi-token-prediction module (mtp.*) is not run"] if self.args.num_nextn_predict_layers else []

    def can_resume(self, start: int) -> bool:
        """The compressors' unfinished windows are a running state: continue only where it stopped."""
        return all(layer.attn.cache is not None and layer.attn.cache.pos == start for layer in self.model.layers)

    def kv_cache_bytes(self, context: int | None = None, dtype: torch.dtype | None = None) -> int:
        """As CausalLM's; for a `context` the compressed entries are counted at their average rate
        (head_dim values every `ratio` tokens), so that per-token figures are not rounded to whole entries."""
        if context is None:
            return super().kv_cache_bytes()
        a, elem = self.args, torch.empty((), dtype=dtype or self.run_dtype).element_size()
        fixed, rate = 0.0, 0.0
        for i in range(a.num_hidden_layers):
            o = a.attention_options(i)
            fixed += max(o.window - 1, 0) * o.head_dim * elem
            if o.ratio:
                rate += o.head_dim * elem / o.ratio
            if o.kind == KINDS[1]:
                rate += o.index_head_dim * elem / o.ratio
        return int(fixed + math.floor(rate * context))

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int = 0, last_only: bool = False,
                on_layer: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        T = self._begin_forward(tokens, start)
        self.tokens.ids = tokens
        streams = self._streams(tokens)
        for i, layer in enumerate(self.model.layers):
            if on_layer is not None:
                on_layer(i, streams)
            streams = layer(streams, start, self.rope, self._taps.get(i))
        if last_only:
            streams = streams[-1:]
        return self.lm_head(self.model.norm(self._collapse(streams))).float()

    def _streams(self, tokens: torch.Tensor) -> torch.Tensor:
        """The token embeddings copied into the hc_mult residual streams [T, n, H]."""
        a = self.args
        x = self.model.embed_tokens(tokens, self.run_dtype)
        return x.unsqueeze(1).expand(tokens.shape[0], a.hc_mult, a.hidden_size).contiguous()

    def _collapse(self, streams: torch.Tensor) -> torch.Tensor:
        head, a = self.model.hc_head, self.args
        return hc_collapse(streams, head.hc_fn, head.hc_base, head.hc_scale, a.hc_eps, a.rms_norm_eps)

    @torch.inference_mode()
    def locate_nonfinite(self, tokens: torch.Tensor, start: int = 0) -> str | None:
        """CausalLM.locate_nonfinite over the residual streams (the stream state is rewritten, as there)."""
        self.tokens.ids = tokens
        streams = self._streams(tokens)
        if not torch.isfinite(streams).all():
            return "the token embeddings (model.embed_tokens)"
        for i, layer in enumerate(self.model.layers):
            streams = layer(streams, start, self.rope, self._taps.get(i))
            if not torch.isfinite(streams).all():
                return f"layer {i} (model.layers.{i})"
        x = self.model.norm(self._collapse(streams))
        if not torch.isfinite(x).all():
            return "the final norm (model.norm)"
        if not torch.isfinite(self.lm_head(x)).all():
            return "the LM head (lm_head)"
        return None

