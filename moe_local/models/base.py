"""The decoder-only transformer every family arranges: embeddings, N decoder layers, norm, LM head.

A family is one short file that says three things:

1. `Args` -- a `ModelArgs` subclass reading its config.json keys (`aliases` for keys that other
   families spell differently, `is_moe_layer` for which layers route);
2. `make_layer(i)` -- the attention and the MLP (dense `MLP`, or `SparseMoE` with a `Router`) of
   layer i, from the blocks in `layers.py`;
3. `checkpoint_map` -- a `CheckpointMap` (moe_local/loading/checkpoint_map.py) stating how the
   checkpoint names its tensors. Parameter names equal checkpoint names
   (`model.layers.3.self_attn.q_proj.weight`), so a map only states what differs from the defaults:

       checkpoint_map = CheckpointMap(
           experts="model.layers.{layer}.block_sparse_moe.experts",  # where layer L's routed experts are
           projections=("w1", "w3", "w2"),                          # per-expert names of gate, up, down
           keep_fp32=("e_score_correction_bias",),                  # loaded in float32 whatever the dtype
           ignore_extra_layers=True,                                # layers past num_hidden_layers (MTP)
       )

   Loading (`models.load_weights`), quantizing (`convert.quantize`) and `inspect` all walk the model
   through `models.weights`, which reads only this map: there is no other place that knows names.
   Routed experts are never module parameters; `renames` bridges module names that differ from the
   checkpoint's, `ignored` lists checkpoint tensors deliberately never read.

A new family registers in `models.FAMILIES` and gives tests/tiny.py `TINY_CONFIGS` a tiny config:
`tests/test_families.py` then checks that its map accounts for every tensor of its checkpoints (per
expert and fused) and that its router look-ahead predicts exactly what its later routers pick.

Everything else (KV cache, rope tables, the router look-ahead the expert cache prefetches with) the
family inherits from `CausalLM`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from moe_local.errors import ConfigError
from moe_local.experts import ACTIVATIONS
from moe_local.models.config_values import check_config_value
from moe_local.loading.checkpoint_map import CheckpointMap
from moe_local.models.layers import Embedding, ExpertsHandle, Linear, RMSNorm, Rope, RopeConfig, Router
from moe_local.models.lookahead import RouterLookahead

Tap = Callable[[str, torch.Tensor], None]  # (site, normed hidden state) inside one decoder layer


@dataclass
class ModelArgs:
    """Config keys shared by all families. Families add theirs and override `from_config`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    head_dim: int | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    raw: dict = field(default_factory=dict, repr=False)

    # config.json key -> our field name, for keys whose names differ between families
    aliases: ClassVar[dict[str, str]] = {}
    required: ClassVar[tuple[str, ...]] = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    )

    # keys that must be >= 1 (integers) or > 0 (numbers) when present; every other integer must be >= 0
    positive: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "max_position_embeddings", "head_dim", "num_experts", "num_experts_per_tok", "rms_norm_eps",
    )
    # every family here routes: a config without these would run with zero experts or top-k 0
    required_moe: ClassVar[tuple[str, ...]] = ("num_experts", "num_experts_per_tok")

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        """Read and check config.json once: a missing key, a wrong type or an out-of-range value is a
        ConfigError naming the key as config.json spells it (never a silent default, never a crash later)."""
        values: dict[str, Any] = {}
        spelled: dict[str, str] = {}  # field -> the config.json key it came from (aliases differ)
        names = {f.name for f in fields(cls)}
        for key, value in cfg.items():
            name = cls.aliases.get(key, key)
            if name in names and name != "raw":
                values[name] = value
                spelled[name] = key
        missing = [k for k in cls.required if values.get(k) is None]
        if missing:
            raise ConfigError(f"config.json lacks required keys {missing} for model_type {cfg.get('model_type')!r}")
        key_of = {v: k for k, v in cls.aliases.items()}
        absent = [spelled.get(k) or key_of.get(k, k) for k in cls.required_moe if values.get(k) is None]
        if absent:
            raise ConfigError(f"config.json lacks required key {absent[0]!r} for model_type {cfg.get('model_type')!r} "
                              f"(a Mixture-of-Experts model needs its expert count and top-k)")
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        hints = typing.get_type_hints(cls)
        for name, value in list(values.items()):
            values[name] = check_config_value(spelled.get(name, name), value, hints[name], name in cls.positive)
        act = values.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"config.json: hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"]
        if heads % kv_heads:
            raise ConfigError(f"config.json: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
        if values.get("head_dim") is None and values["hidden_size"] % heads:
            raise ConfigError(f"config.json: hidden_size={values['hidden_size']} is not a multiple of "
                              f"num_attention_heads={heads} (and no head_dim is given)")
        top_k, n_experts = values["num_experts_per_tok"], values["num_experts"]
        if top_k > n_experts:
            raise ConfigError(f"config.json: num_experts_per_tok={top_k} is more than the "
                              f"{n_experts} experts of a layer ({spelled.get('num_experts', 'num_experts')})")
        args = cls(raw=cfg, **values)
        args.__post_init_args__()
        return args

    def __post_init_args__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer: int) -> bool:
        return True

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def rope_config(self) -> RopeConfig:
        return RopeConfig.from_config(self.raw, self.head_dim)

    @property
    def expert_act(self):
        """The routed experts' activation as providers take it (experts.activation): the config's
        `hidden_act` name, or a gated activation object (gpt-oss's ClampedSwiGLU)."""
        return self.hidden_act

    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up, down; families with expert biases add them)."""
        return 3 * self.hidden_size * self.moe_intermediate_size


def text_model_config(cfg: dict) -> dict | None:
    """The text model's keys of a multimodal config.json (Qwen3.5-MoE, Kimi-K2.5: `text_config` beside a
    `vision_config`), as one flat config of the outer `model_type`; None for a text-only config.

    The top-level `tie_word_embeddings` wins over the text config's: it is the one transformers ties by."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        return None
    merged = {k: v for k, v in text.items() if k != "multimodal"}
    merged["model_type"] = cfg.get("model_type")
    if "tie_word_embeddings" in cfg:
        merged["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return merged


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)).

    The token mixer is attention (`self_attn`) in most families; hybrid families name theirs as their
    checkpoints do (Qwen3-Next's `linear_attn`), hence `attn_name`. Every mixer takes (x, start, rope)
    and owns its cache (`setup_cache`, `.cache.nbytes()`). `norm` is the RMSNorm variant the family uses.
    """

    def __init__(self, attn: nn.Module, mlp: nn.Module, hidden: int, eps: float, mlp_name: str = "mlp",
                 attn_name: str = "self_attn", norm: type[nn.Module] = RMSNorm) -> None:
        super().__init__()
        self.attn_name = attn_name
        setattr(self, attn_name, attn)
        self.input_layernorm = norm(hidden, eps)
        self.post_attention_layernorm = norm(hidden, eps)
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.attn_name)

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self.mlp_name)

    def forward(self, x: torch.Tensor, start: int, rope, tap: Tap | None = None) -> torch.Tensor:
        """tap(site, h): called with the normed input of the attention ("attn") and of the MLP ("mlp")."""
        h = self.input_layernorm(x)
        if tap is not None:
            tap("attn", h)
        x = x + self.mixer(h, start, rope)
        h = self.post_attention_layernorm(x)
        if tap is not None:
            tap("mlp", h)
        return x + self.ffn(h)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs, layers: list[DecoderLayer], norm: type[nn.Module] = RMSNorm) -> None:
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = norm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """A family's model. Subclasses set `family`, `Args` and `checkpoint_map` and implement `make_layer`."""

    family: ClassVar[str] = ""
    Args: ClassVar[type[ModelArgs]] = ModelArgs
    Norm: ClassVar[type[nn.Module]] = RMSNorm  # the final norm's class (decoder layers get theirs in make_layer)
    checkpoint_map: ClassVar[CheckpointMap] = CheckpointMap()

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.experts = ExpertsHandle()
        self.model = Backbone(args, [self.make_layer(i) for i in range(args.num_hidden_layers)], self.Norm)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        # The dtype activations, caches and rope tables run in (set by `load_weights`). Not any
        # weight's dtype: matmul weights stay as stored (bf16 on a float32 CPU run) or packed.
        self.run_dtype: torch.dtype = torch.float32
        self.rope: Rope | None = None
        self.max_len = 0
        # bumped by every forward and every setup_cache: whatever may have changed the KV cache's
        # contents, so a caller that keeps a prefix there can tell whether someone else wrote it since
        self.kv_version = 0
        self._listeners: list[tuple[frozenset[tuple[int, str]], Callable[[int, torch.Tensor, str], None]]] = []
        self._taps: dict[int, Tap] = {}

    @property
    def run_device(self) -> torch.device:
        """Where the model computes: the final norm's device (a norm is always a plain tensor)."""
        return self.model.norm.weight.device

    # ------------------------------------------------------------ family hooks
    def make_layer(self, i: int) -> DecoderLayer:
        raise NotImplementedError

    def make_rope(self, max_len: int, device, dtype) -> Rope:
        return Rope(self.args.rope_config(), max(max_len, 1), device, dtype)

    def notes(self) -> list[str]:
        """One-line remarks a user should see once at load time (e.g. parts of the checkpoint not run)."""
        return []

    # ------------------------------------------------------------ running
    def setup_cache(self, max_len: int) -> None:
        """Allocate the KV cache (and rope tables) for sequences of up to max_len tokens."""
        device, dtype = self.run_device, self.run_dtype
        self.max_len = max_len
        self.kv_version += 1
        self.rope = self.make_rope(max_len, device, dtype)
        for layer in self.model.layers:
            layer.mixer.setup_cache(max_len, device, dtype)

    def kv_cache_bytes(self, context: int | None = None, dtype: torch.dtype | None = None) -> int:
        """Bytes of the KV cache allocated now; with `context`, of one for that many tokens in `dtype`
        (sized on the meta device: nothing is allocated and the current cache is kept)."""
        if context is None:
            return sum(layer.mixer.cache.nbytes() for layer in self.model.layers if layer.mixer.cache is not None)
        total = 0
        for layer in self.model.layers:
            attn, old = layer.mixer, layer.mixer.cache
            try:
                attn.setup_cache(context, torch.device("meta"), dtype or self.run_dtype)
                total += attn.cache.nbytes()
            finally:
                attn.cache = old
        return total

    def can_resume(self, start: int) -> bool:
        """Whether a forward may start at `start` and reuse the cached positions before it.

        A KV cache can: positions >= start are simply overwritten. A recurrent state (hybrid families)
        holds one summary of its whole history, which can only be continued from the exact position
        it reached; those families override this (see `runtime.Generator`'s prefix reuse)."""
        return True

    def routers(self) -> dict[int, Router]:
        """Layer index -> router module, for predicting later layers' experts."""
        out = {}
        for i, layer in enumerate(self.model.layers):
            gate = getattr(layer.ffn, "gate", None)
            if gate is not None and hasattr(gate, "rule"):
                out[i] = gate
        return out

    # ------------------------------------------------------------ router look-ahead
    def lookahead(self, depth: int, extra: int = 0) -> RouterLookahead:
        """The experts.ExpertPredictor of this model: the routers of the next `depth` MoE layers
        applied to the current hidden state (+ `extra` spare ids), for the expert cache to prefetch."""
        return RouterLookahead(self.routers(), self.model.layers, self.listen, depth, extra)

    def listen(self, points: Sequence[tuple[int, str]],
               callback: Callable[[int, torch.Tensor, str], None]) -> Callable[[], None]:
        """Call `callback(layer, h, site)` during forward at every (layer, site) of `points`, h being
        the normed input of that layer's attention (site "attn") or MLP ("mlp"). Returns the
        function that stops it."""
        entry = (frozenset(points), callback)
        self._listeners.append(entry)
        self._rebuild_taps()

        def stop() -> None:
            if entry in self._listeners:
                self._listeners.remove(entry)
                self._rebuild_taps()

        return stop

    def _rebuild_taps(self) -> None:
        self._taps = {}
        for layer in sorted({l for points, _ in self._listeners for l, _ in points}):
            calls = [(frozenset(s for l, s in points if l == layer), cb) for points, cb in self._listeners]

            def tap(site: str, h: torch.Tensor, layer: int = layer, calls=calls) -> None:
                for sites, cb in calls:
                    if site in sites:
                        cb(layer, h, site)

            self._taps[layer] = tap

    # ------------------------------------------------------------ running
    def _begin_forward(self, tokens: torch.Tensor, start: int) -> int:
        """What every forward does first (families that override `forward` too): refuse a sequence
        past the cache and mark the cache as changed. Returns T."""
        T = tokens.shape[0]
        if start + T > self.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the cache of {self.max_len}")
        assert self.rope is not None
        self.kv_version += 1
        return T

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int = 0, last_only: bool = False,
                on_layer: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """tokens: [T] ids at positions start..start+T-1. Returns float32 logits [T, vocab] (or [1, vocab])."""
        T = self._begin_forward(tokens, start)
        rope = self.rope(start, T)
        x = self.model.embed_tokens(tokens, self.run_dtype)
        for i, layer in enumerate(self.model.layers):
            if on_layer is not None:
                on_layer(i, x)
            x = layer(x, start, rope, self._taps.get(i))
        if last_only:
            x = x[-1:]
        return self.lm_head(self.model.norm(x)).float()

    @torch.inference_mode()
    def locate_nonfinite(self, tokens: torch.Tensor, start: int = 0) -> str | None:
        """Run `tokens` again and name the first module whose output holds NaN or Inf (None: all finite).

        Called only after the logits of a step were found non-finite, so the normal forward pays one
        check per token instead of one per layer. Rewrites the same cache positions the failed step
        wrote (a recurrent state advances again: the caller discards its cached sequence)."""
        rope = self.rope(start, tokens.shape[0])
        x = self.model.embed_tokens(tokens)
        if not torch.isfinite(x).all():
            return "the token embeddings (model.embed_tokens)"
        for i, layer in enumerate(self.model.layers):
            x = layer(x, start, rope, self._taps.get(i))
            if not torch.isfinite(x).all():
                return f"layer {i} (model.layers.{i})"
        x = self.model.norm(x)
        if not torch.isfinite(x).all():
            return "the final norm (model.norm)"
        if not torch.isfinite(self.lm_head(x)).all():
            return "the LM head (lm_head)"
        return None
