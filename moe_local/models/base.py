"""The decoder-only transformer every family arranges: embeddings, N decoder layers, norm, LM head.

A family (one short file each) subclasses `ModelArgs` to read its config.json keys and subclasses
`CausalLM` to say which attention and which MLP each layer gets and how its experts are named.
Parameter names equal checkpoint tensor names (`model.layers.3.self_attn.q_proj.weight`), with a
family's `sanitize()` to bridge any difference, so loading is a name-for-name copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from moe_local.errors import ConfigError
from moe_local.loading.hf_experts import ExpertLayout
from moe_local.models.layers import ExpertsHandle, RMSNorm, Rope, RopeConfig


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

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        values: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        for key, value in cfg.items():
            name = cls.aliases.get(key, key)
            if name in names and name != "raw":
                values[name] = value
        missing = [k for k in cls.required if values.get(k) is None]
        if missing:
            raise ConfigError(f"config.json lacks required keys {missing} for model_type {cfg.get('model_type')!r}")
        values.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = cfg["num_attention_heads"]
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

    def forward(self, x: torch.Tensor, start: int, rope) -> torch.Tensor:
        x = x + self.mixer(self.input_layernorm(x), start, rope)
        return x + self.ffn(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs, layers: list[DecoderLayer], norm: type[nn.Module] = RMSNorm) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = norm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """A family's model. Subclasses implement `make_layer` and `expert_layout`."""

    family: ClassVar[str] = ""
    Args: ClassVar[type[ModelArgs]] = ModelArgs
    Norm: ClassVar[type[nn.Module]] = RMSNorm  # the final norm's class (decoder layers get theirs in make_layer)

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.experts = ExpertsHandle()
        self.model = Backbone(args, [self.make_layer(i) for i in range(args.num_hidden_layers)], self.Norm)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope: Rope | None = None
        self.max_len = 0

    # ------------------------------------------------------------ family hooks
    def make_layer(self, i: int) -> DecoderLayer:
        raise NotImplementedError

    def expert_layout(self) -> ExpertLayout:
        raise NotImplementedError

    def make_rope(self, max_len: int, device, dtype) -> Rope:
        return Rope(self.args.rope_config(), max(max_len, 1), device, dtype)

    def sanitize(self, name: str) -> str:
        """Checkpoint tensor name for a parameter name (identity unless a family renames)."""
        return name

    def skip_checkpoint_tensor(self, name: str) -> bool:
        """Checkpoint tensors we deliberately ignore (routed experts, rotary buffers, MTP layers)."""
        return ".experts." in name or "rotary_emb" in name

    def notes(self) -> list[str]:
        """One-line remarks a user should see once at load time (e.g. parts of the checkpoint not run)."""
        return []

    # ------------------------------------------------------------ running
    def setup_cache(self, max_len: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Allocate the KV cache (and rope tables) for sequences of up to max_len tokens.

        device/dtype default to the model's own; `inspect` passes the meta device and the run dtype
        to size a cache without allocating it."""
        device = self.lm_head.weight.device if device is None else device
        dtype = self.lm_head.weight.dtype if dtype is None else dtype
        self.max_len = max_len
        self.rope = self.make_rope(max_len, device, dtype)
        for layer in self.model.layers:
            layer.mixer.setup_cache(max_len, device, dtype)

    def kv_cache_bytes(self) -> int:
        return sum(layer.mixer.cache.nbytes() for layer in self.model.layers if layer.mixer.cache is not None)

    def can_resume(self, start: int) -> bool:
        """Whether a forward may start at `start` and reuse the cached positions before it.

        A KV cache can: positions >= start are simply overwritten. A recurrent state (hybrid families)
        holds one summary of its whole history, which can only be continued from the exact position
        it reached; those families override this (see `runtime.Generator`'s prefix reuse)."""
        return True

    def routers(self) -> dict[int, nn.Module]:
        """Layer index -> router module, for predicting later layers' experts."""
        out = {}
        for i, layer in enumerate(self.model.layers):
            gate = getattr(layer.ffn, "gate", None)
            if gate is not None and hasattr(gate, "rule"):
                out[i] = gate
        return out

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int = 0, last_only: bool = False,
                on_layer: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """tokens: [T] ids at positions start..start+T-1. Returns float32 logits [T, vocab] (or [1, vocab])."""
        T = tokens.shape[0]
        if start + T > self.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the cache of {self.max_len}")
        assert self.rope is not None
        rope = self.rope(start, T)
        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            if on_layer is not None:
                on_layer(i, x)
            x = layer(x, start, rope)
        if last_only:
            x = x[-1:]
        return self.lm_head(self.model.norm(x)).float()
