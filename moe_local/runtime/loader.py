"""Load a model reference into something that can generate: model + expert provider (+ tokenizer).

This is the one place that knows how the pieces meet: the checkpoint (or pack) supplies the
non-expert weights to the model and the routed experts to an ExpertProvider, which is attached to
the model through its expert handle. Swapping `ResidentExperts` for the tiered cache happens here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moe_local.cache.options import CacheOptions, provider_factory
from moe_local.errors import CheckpointError, ConfigError, MoeLocalError
from moe_local.experts import ExpertProvider, ExpertSource, ResidentExperts
from moe_local.formats import kernels_cpu
from moe_local.formats.pack import Pack, is_pack
from moe_local.loading.checkpoint import Checkpoint
from moe_local.loading.hub import resolve_model_dir
from moe_local.models import CausalLM, build_model, checkpoint_experts, load_weights
from moe_local.runtime.threads import apply_threads, parse_threads, resolve_threads
from moe_local.units import DTYPES, RUN_DTYPES


ProviderFactory = Callable[[ExpertSource, CausalLM, torch.device, torch.dtype], ExpertProvider]


def resident_provider(source: ExpertSource, model: CausalLM, device: torch.device, dtype: torch.dtype) -> ExpertProvider:
    grouped = kernels_cpu.layer_kernel if device.type == "cpu" else None  # one C call per MoE layer
    return ResidentExperts(source, act=model.args.expert_act, device=device, dtype=dtype, grouped=grouped)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (what checkpoints ship in); float32 on CPUs, whose bf16 matmuls are slow and lossy."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bad = MoeLocalError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise bad
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message ("Invalid device string") names no flag and comes with a traceback
        raise bad from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoeLocalError("--device cuda asked for, but torch sees no CUDA device")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """A --dtype value (None: the device's default) as a torch dtype; anything else is refused."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return default_dtype(device or torch.device("cpu"))
    if name not in RUN_DTYPES:
        raise MoeLocalError(f"--dtype must be one of {', '.join(RUN_DTYPES)}, got {name!r}")
    return DTYPES[name].torch


EXPERT_MODES = ("tiered", "resident")


@dataclass
class LoadOptions:
    """Where a model runs and where its routed experts live: what the `generate` / `chat` flags say."""

    device: str | None = None
    dtype: str | None = None
    experts: str = "tiered"  # tiered: paged through the expert cache (moe_local.cache); resident: all loaded
    cache: CacheOptions = field(default_factory=CacheOptions)
    threads: str | int | None = None  # -t/--threads; check() turns None into runtime.threads.default_threads()

    def check(self) -> None:
        """Refuse a bad value before anything is read, in one line naming the flag."""
        self.threads = resolve_threads(self.threads)
        resolve_dtype(self.dtype)
        resolve_device(self.device)  # a bad cuda:N, or cuda without CUDA, fails here too
        if self.experts not in EXPERT_MODES:
            raise MoeLocalError(f"--experts must be tiered or resident, got {self.experts!r}")
        if self.experts == "tiered":
            self.cache.validate()

    def provider(self) -> ProviderFactory:
        """The one place that decides where experts live: the tiered cache, or all resident."""
        return resident_provider if self.experts == "resident" else provider_factory(self.cache)

    def report_options(self) -> dict:
        """What a run report records of these options (the cache's; nothing when experts are resident)."""
        return self.cache.report_dict() if self.experts == "tiered" else {}


@dataclass
class LoadedModel:
    model: CausalLM
    root: Path
    config: dict
    source: ExpertSource
    provider: ExpertProvider
    device: torch.device
    dtype: torch.dtype
    threads: int = 1  # CPU threads the run computes with (runtime.threads)


def open_weights(root: Path):
    """A Checkpoint for a Hugging Face folder; a pack reader for a moe-local pack (see moe_local.formats.pack)."""
    return Pack(root) if is_pack(root) else Checkpoint(root)


def expert_source_for(weights, model: CausalLM) -> ExpertSource:
    """The pack itself (an ExpertBytesSource) for a pack; routed experts read from the checkpoint otherwise."""
    a = model.args
    if isinstance(weights, Pack):
        if list(weights.moe_layers) != list(a.moe_layers) or weights.num_experts != a.num_experts:
            raise CheckpointError(
                f"pack holds experts of layers {weights.moe_layers} x {weights.num_experts}, config.json implies "
                f"layers {a.moe_layers} x {a.num_experts}", weights.manifest_path)
        return weights
    return checkpoint_experts(model, weights)


def build_model_for(config: dict, root: Path) -> CausalLM:
    """build_model, with config errors naming the config.json they came from."""
    try:
        return build_model(config)
    except ConfigError as exc:
        if exc.path is not None:
            raise
        raise ConfigError(str(exc).removeprefix("config.json: "), root / "config.json") from None


def load_model(
    ref: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    provider: ProviderFactory = resident_provider,
    revision: str | None = None,
    threads: str | int | None = None,
) -> LoadedModel:
    """Resolve, build, fill and attach experts; size the CPU thread pools to `threads` (None: leave
    them as the process has them). Raises MoeLocalError subclasses on bad input."""
    n_threads = parse_threads(threads)
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    dt = resolve_dtype(dtype, dev)
    n_threads = apply_threads(n_threads)
    root = resolve_model_dir(ref, revision)
    weights = open_weights(root)
    model = build_model_for(weights.config, root)
    load_weights(model, weights, dev, dt)
    source = expert_source_for(weights, model)
    prov = provider(source, model, dev, dt)
    model.experts.provider = prov
    return LoadedModel(model, root, weights.config, source, prov, dev, dt, n_threads)
