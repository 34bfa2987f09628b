"""Memory budgets: detect defaults for `--gpu-mem` / `--ram` and turn a budget into slots (units.parse_size
reads the flags).

One meaning for every budget flag (`--ram`, `--gpu-mem`, `simulate --budget`, and the minimum
`inspect` prints): the memory the process uses for the model on that device --

- on a CPU, `--ram` = resident (non-expert) weights + the KV cache for the reserved context + the
  expert slots. What it does not count is stated as the allowance: one prefill chunk's activations
  (bounded by chunked prefill, `prefill_chunk`) and the interpreter/torch baseline;
- on a GPU, `--gpu-mem` = resident weights + KV cache for the reserved context + a workspace
  (activations of one prefill chunk, dequantized projections, cuBLAS/Triton workspaces, allocator
  fragmentation) + the GPU expert slots; `--ram` then sizes the pinned RAM tier.

Why a plan object: the budget is a hard limit, so everything besides the expert slots is subtracted
up front and the slot slab is allocated once. A budget that cannot hold one layer's top-k experts
after that is refused with the minimum that would work (rounded up, so that figure is accepted),
instead of failing later with an out-of-memory in the middle of a token. The KV cache never grows past
the context planned here (`kv_tokens`): the generator caps its context at it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_local.errors import MoeLocalError
from moe_local.formats.schemes import PackedWeight
from moe_local.units import GiB, MiB, format_bytes

# Headroom left to others when we pick a default (stated in --help and the README).
GPU_HEADROOM_FRACTION = 0.10  # of the device's total memory, at least GPU_HEADROOM_MIN
GPU_HEADROOM_MIN = 1 * GiB
RAM_DEFAULT_FRACTION = 0.50  # of the memory psutil reports available at start-up
WORKSPACE_MIN = 256 * MiB  # activations, router/top-k temporaries
GPU_LIBRARY_RESERVE = 128 * MiB  # cuBLAS / cuBLASLt / Triton workspaces, created lazily by the first matmuls
GPU_FRAGMENTATION = 0.05  # of the budget: what the caching allocator holds but cannot hand out
SLOT_ALIGN = 4096  # every slot starts on a page, like every expert range in a pack
KV_CONTEXT_DEFAULT = 4096  # tokens of KV cache a budget reserves unless told (serve --ctx-size)
PREFILL_CHUNK_MAX = 512  # tokens per prefill forward at most (same logits as one forward, bounded activations)
SCORE_BYTES = 4  # attention scores are computed in float32


def default_gpu_budget(device: torch.device, already_resident: int = 0) -> int:
    """Free device memory now, minus max(1 GiB, 10% of the card) for the CUDA context and other users.

    `already_resident`: bytes of the model already on the device when this is asked (the resident
    weights are loaded before the cache is sized). They are part of what the budget must hold, and
    the plan subtracts them again, so they are added back here instead of being counted twice."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free + already_resident - max(GPU_HEADROOM_MIN, GPU_HEADROOM_FRACTION * total)))


def default_ram_budget() -> int:
    """Half of the memory available now: the page cache keeps serving the pack's mmap from the rest."""
    import psutil

    return int(psutil.virtual_memory().available * RAM_DEFAULT_FRACTION)


def round_slot(nbytes: int) -> int:
    return -(-int(nbytes) // SLOT_ALIGN) * SLOT_ALIGN


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of the resident (non-expert) weights and buffers as held, tied weights counted once:
    parameters at their own dtype (a bf16 matrix counts 2 bytes per weight) plus the packed weights
    (`PackedWeight`, a pack's `--dense int8|int4` tensors) that replace some modules' parameters."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    packed = {id(w): w for m in model.modules() for w in vars(m).values() if isinstance(w, PackedWeight)}
    return total + sum(w.nbytes for w in packed.values())


def workspace_bytes(expanded_bytes: int, budget: int | None = None) -> int:
    """GPU reserve besides weights, KV and slots: 256 MiB of activations and temporaries (a prefill
    chunk's attention scores are sized to fit half of it, see `prefill_chunk`) + 2x the largest
    expanded projection + cuBLAS/Triton workspaces + 5% of the budget for allocator fragmentation."""
    frag = int(GPU_FRAGMENTATION * budget) if budget else 0
    return WORKSPACE_MIN + 2 * int(expanded_bytes) + GPU_LIBRARY_RESERVE + frag


def prefill_chunk(heads: int, context: int, workspace: int = WORKSPACE_MIN) -> int:
    """Tokens per prefill forward so one chunk's attention scores and probabilities (heads x chunk x
    context, float32, two copies) fit in half the activation workspace: at most PREFILL_CHUNK_MAX,
    at least 16. Mixtral (32 heads, 4096 positions): 128 tokens; the shared test model: 512."""
    per_token = 2 * max(1, heads) * max(1, context) * SCORE_BYTES
    return int(max(16, min(PREFILL_CHUNK_MAX, (workspace // 2) // per_token)))


def min_budget(*, slot_bytes: int, top_k: int, resident_bytes: int, kv_bytes: int = 0, expanded_bytes: int = 0,
               cuda: bool = False) -> int:
    """The smallest budget plan_budget accepts: on a CPU the --ram that holds the resident weights,
    the KV cache and one layer's top-k expert slots; on CUDA the --gpu-mem that holds resident
    weights + KV cache + workspace + one layer's top-k slots. Shared by the budget check and
    `inspect`, so the minimum shown is the one enforced."""
    fixed = resident_bytes + kv_bytes
    slots = top_k * round_slot(slot_bytes)
    if not cuda:
        return fixed + slots
    # the fragmentation reserve is a share of the budget itself: the smallest b with
    # b - int(GPU_FRAGMENTATION * b) >= fixed + slots + the fixed part of the workspace
    need = fixed + slots + workspace_bytes(expanded_bytes)
    return math.ceil(need / (1 - GPU_FRAGMENTATION)) + 1


@dataclass
class BudgetPlan:
    """How a budget is spent. All sizes in bytes; slots are whole experts of `slot_bytes` each."""

    slot_bytes: int
    gpu_budget: int | None  # None without CUDA
    ram_budget: int
    resident_bytes: int
    kv_bytes: int
    workspace_bytes: int
    gpu_slots: int  # 0 without CUDA
    host_slots: int
    kv_tokens: int = 0  # the context the KV cache was planned for; generation never grows it past this

    @property
    def fixed_bytes(self) -> int:
        """Bytes of the slot budget's device spent on everything but expert slots (what `simulate
        --budget` must subtract to buy the same slots from the same figure)."""
        if self.gpu_budget is not None:
            return self.resident_bytes + self.kv_bytes + self.workspace_bytes
        return self.resident_bytes + self.kv_bytes

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def plan_budget(
    *,
    slot_bytes: int,
    num_keys: int,
    top_k: int,
    resident_bytes: int,
    kv_bytes: int,
    expanded_bytes: int,
    gpu_budget: int | None,
    ram_budget: int,
    cuda: bool,
    kv_tokens: int = 0,
) -> BudgetPlan:
    """Turn budgets into slot counts; refuse (with the minimum) a budget that cannot serve one layer.

    expanded_bytes: the largest projection expanded to the compute dtype (a dequantize-then-matmul
    kernel may materialise one); the workspace reserve is 256 MiB + 2x that.
    """
    slot = round_slot(slot_bytes)
    workspace = workspace_bytes(expanded_bytes, gpu_budget)
    gpu_slots = 0
    if cuda:
        assert gpu_budget is not None
        fixed = resident_bytes + kv_bytes + workspace
        gpu_slots = max(0, (gpu_budget - fixed) // slot)
        if gpu_slots < top_k:
            need = min_budget(slot_bytes=slot, top_k=top_k, resident_bytes=resident_bytes, kv_bytes=kv_bytes,
                              expanded_bytes=expanded_bytes, cuda=True)
            raise MoeLocalError(
                f"--gpu-mem {format_bytes(gpu_budget)} is too small: resident weights {format_bytes(resident_bytes)} + KV cache "
                f"{format_bytes(kv_bytes)} ({kv_tokens} tokens) + workspace {format_bytes(workspace)} + one layer's "
                f"top-{top_k} experts ({top_k} x {format_bytes(slot)}) need at least {format_bytes(need, round_up=True)}"
            )
        gpu_slots = min(gpu_slots, num_keys)
        host_fixed = 0
        host_min = top_k  # pinned staging for one layer's transfers
    else:
        host_fixed = resident_bytes + kv_bytes  # on a CPU the model itself (weights and KV cache) lives in RAM
        host_min = top_k
    host_slots = max(0, (ram_budget - host_fixed) // slot)
    if host_slots < host_min:
        # on CUDA the RAM tier only stages one layer's transfers: no resident weights there
        need = min_budget(slot_bytes=slot, top_k=host_min, resident_bytes=host_fixed)
        kv = f"KV cache {format_bytes(kv_bytes)} ({kv_tokens} tokens) + " if kv_bytes else ""
        what = "" if cuda else f"resident weights {format_bytes(resident_bytes)} + {kv}"
        raise MoeLocalError(
            f"--ram {format_bytes(ram_budget)} is too small: {what}one layer's top-{top_k} experts "
            f"({top_k} x {format_bytes(slot)}) need at least {format_bytes(need, round_up=True)}"
        )
    host_slots = min(host_slots, num_keys)
    return BudgetPlan(slot, gpu_budget if cuda else None, ram_budget, resident_bytes, kv_bytes,
                      workspace if cuda else 0, gpu_slots, host_slots, kv_tokens)
