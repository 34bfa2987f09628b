"""CacheOptions (what the CLI flags say) and the provider factory the loader calls.

The CLI maps `--gpu-mem --ram --policy --prefetch-depth --prefetch-extra --miss --trace` onto
`CacheOptions` and passes `provider_factory(options)` to `runtime.loader.load_model(provider=...)`;
the loader calls it with the expert source, the model (already holding its resident weights), the
device and the dtype. `--stats-json` is written by the runtime from `provider.report()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from moe_local.cache.adapters import CheckpointBytes
from moe_local.cache.budget import (KV_CONTEXT_DEFAULT, BudgetPlan, default_gpu_budget, default_ram_budget,
                                    module_bytes, plan_budget)
from moe_local.cache.policies import POLICIES
from moe_local.cache.simulate import future_from_trace
from moe_local.cache.tiered import MISS_MODES, TieredExperts
from moe_local.cache.trace import TraceRecorder
from moe_local.errors import MoeLocalError
from moe_local.units import format_bytes, parse_size


@dataclass
class CacheOptions:
    gpu_mem: int | str | None = None  # None: free GPU memory minus headroom (see budget.py)
    ram: int | str | None = None  # None: half the available RAM
    policy: str = "lru"
    prefetch_depth: int = 1
    prefetch_extra: int = 0
    miss: str = "auto"  # transfer | cpu | auto (only matters with a GPU)
    trace: str | Path | None = None  # write the routing trace here
    belady_trace: str | Path | None = None  # `--policy belady`: the trace of the same run, recorded earlier
    future: Sequence | None = None  # or the demand sequence itself (tests)
    context: int = KV_CONTEXT_DEFAULT  # tokens of KV cache the budget reserves (capped at the model's context)
    io_threads: int = 4
    record_accesses: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.policy not in POLICIES and self.policy != "lfu":
            raise MoeLocalError(f"--policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.miss not in MISS_MODES:
            raise MoeLocalError(f"--miss {self.miss!r} is not one of {', '.join(MISS_MODES)}")
        if self.prefetch_depth < 0 or self.prefetch_extra < 0:
            raise MoeLocalError("--prefetch-depth and --prefetch-extra must be >= 0")
        if self.policy == "belady" and self.future is None and self.belady_trace is None:
            raise MoeLocalError("--policy belady needs the routing trace of the same run (--belady-trace FILE)")
        parse_size(self.gpu_mem, "--gpu-mem")
        check_ram(parse_size(self.ram, "--ram"))

    def report_dict(self) -> dict:
        return {"gpu_mem": parse_size(self.gpu_mem, "--gpu-mem"), "ram": parse_size(self.ram, "--ram"),
                "policy": self.policy, "prefetch_depth": self.prefetch_depth,
                "prefetch_extra": self.prefetch_extra, "miss": self.miss}


def check_ram(ram: int | None) -> None:
    """A --ram the machine does not have is a mistake (a typo'd unit), not a budget: refuse it."""
    import psutil

    total = psutil.virtual_memory().total
    if ram is not None and ram > total:
        raise MoeLocalError(f"--ram {format_bytes(ram)} is more than this machine's physical memory "
                            f"({format_bytes(total)})")


def check_gpu_mem(gpu_mem: int | None, device: torch.device) -> None:
    """Likewise for --gpu-mem against the card's total memory."""
    if gpu_mem is None:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if gpu_mem > total:
        raise MoeLocalError(f"--gpu-mem {format_bytes(gpu_mem)} is more than {device}'s memory ({format_bytes(total)})")


def kv_context(requested: int | None, model_context: int) -> int:
    """Tokens of KV cache a budget plans for: the request (serve --ctx-size; 4096 by default), never
    more than the model's context."""
    return int(min(requested or KV_CONTEXT_DEFAULT, model_context))


def as_bytes_source(source):
    """A pack reader is already an ExpertBytesSource; a plain checkpoint is adapted."""
    if all(hasattr(source, m) for m in ("read_into", "decode", "max_expert_nbytes", "expert_nbytes")):
        return source
    return CheckpointBytes(source)


def build_tiered(options: CacheOptions, source, model, device: torch.device, dtype: torch.dtype) -> TieredExperts:
    options.validate()
    device = torch.device(device)
    src = as_bytes_source(source)
    args = model.args
    top_k = int(args.num_experts_per_tok)
    cuda = device.type == "cuda"
    gpu_budget = parse_size(options.gpu_mem, "--gpu-mem")
    if cuda:
        check_gpu_mem(gpu_budget, device)
    resident = module_bytes(model)  # already on `device`: loading put the non-expert weights there
    if cuda and gpu_budget is None:
        gpu_budget = default_gpu_budget(device, already_resident=resident)
    ram_budget = parse_size(options.ram, "--ram")
    if ram_budget is None:
        ram_budget = default_ram_budget()
    inter = int(args.moe_intermediate_size or args.intermediate_size)
    elem = torch.empty((), dtype=dtype).element_size()
    kv_tokens = kv_context(options.context, args.max_position_embeddings)
    plan: BudgetPlan = plan_budget(
        slot_bytes=src.max_expert_nbytes(),
        num_keys=len(src.moe_layers) * src.num_experts,
        top_k=top_k,
        resident_bytes=resident,
        kv_bytes=model.kv_cache_bytes(kv_tokens, dtype),  # on the GPU with CUDA, in RAM on a CPU
        expanded_bytes=inter * args.hidden_size * elem,
        gpu_budget=gpu_budget,
        ram_budget=ram_budget,
        cuda=cuda,
        kv_tokens=kv_tokens,
    )
    future = options.future
    if future is None and options.belady_trace is not None:
        future = future_from_trace(options.belady_trace)
    # the model's own router look-ahead (experts.ExpertPredictor); the cache never looks inside the model
    predictor = model.lookahead(options.prefetch_depth, options.prefetch_extra) if options.prefetch_depth > 0 else None
    trace = None
    if options.trace is not None:
        # what the same budget spent besides slots, so `simulate --budget X` means what `--ram X` did
        trace = TraceRecorder(options.trace, args.model_type, src.num_experts, top_k, src.moe_layers,
                              src.max_expert_nbytes(), budget={"slot_bytes": plan.slot_bytes,
                                                               "fixed_bytes": plan.fixed_bytes,
                                                               "device": "gpu" if cuda else "ram"})
    return TieredExperts(
        src, top_k=top_k, host_slots=plan.host_slots, gpu_slots=plan.gpu_slots, act=args.expert_act,
        device=device, dtype=dtype, policy=options.policy, future=future,
        future_label=f"--belady-trace {options.belady_trace}" if options.belady_trace is not None else None,
        predictor=predictor,
        miss=options.miss, io_threads=options.io_threads, trace=trace, plan=plan,
        record_accesses=options.record_accesses,
    )


def provider_factory(options: CacheOptions) -> Callable:
    """`ProviderFactory` for runtime.loader.load_model: (source, model, device, dtype) -> TieredExperts."""
    options.validate()

    def factory(source, model, device, dtype):
        return build_tiered(options, source, model, device, dtype)

    return factory
