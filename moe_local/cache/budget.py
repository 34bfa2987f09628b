"""Memory budgets: detect defaults for `--gpu-mem` / `--ram` and turn a budget into slots (units.parse_size
reads the flags).

Why a plan object: the GPU budget is a hard limit, so everything that lives on the GPU besides the
expert slots (resident weights, the KV cache, an activation workspace) is subtracted up front and the
slot slab is allocated once. A budget that cannot hold one layer's top-k experts after that is refused
with the minimum that would work, instead of failing later with an out-of-memory in the middle of a
token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_local.errors import MoeLocalError
from moe_local.formats.schemes import PackedWeight
from moe_local.units import GiB, MiB, format_bytes

# Headroom left to others when we pick a default (stated in --help and the README).
GPU_HEADROOM_FRACTION = 0.10  # of the device's total memory, at least GPU_HEADROOM_MIN
GPU_HEADROOM_MIN = 1 * GiB
RAM_DEFAULT_FRACTION = 0.50  # of the memory psutil reports available at start-up
WORKSPACE_MIN = 256 * MiB  # activations, router/top-k temporaries, allocator fragmentation
SLOT_ALIGN = 4096  # every slot starts on a page, like every expert range in a pack


def default_gpu_budget(device: torch.device) -> int:
    """Free device memory now, minus max(1 GiB, 10% of the card) for the CUDA context and other users."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free - max(GPU_HEADROOM_MIN, GPU_HEADROOM_FRACTION * total)))


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


def workspace_bytes(expanded_bytes: int) -> int:
    """GPU reserve for activations and temporaries: 256 MiB + 2x the largest expanded projection."""
    return WORKSPACE_MIN + 2 * int(expanded_bytes)


def min_budget(*, slot_bytes: int, top_k: int, resident_bytes: int, kv_bytes: int = 0, expanded_bytes: int = 0,
               cuda: bool = False) -> int:
    """The smallest budget plan_budget accepts: on a CPU the --ram that holds the resident weights
    (+ kv_bytes, which the CPU path passes as 0) and one layer's top-k expert slots; on CUDA the
    --gpu-mem that holds resident weights + KV cache + workspace + one layer's top-k slots.
    Shared by the budget check and `inspect`, so the minimum shown is the one enforced."""
    fixed = resident_bytes + kv_bytes + (workspace_bytes(expanded_bytes) if cuda else 0)
    return fixed + top_k * round_slot(slot_bytes)


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
) -> BudgetPlan:
    """Turn budgets into slot counts; refuse (with the minimum) a budget that cannot serve one layer.

    expanded_bytes: the largest projection expanded to the compute dtype (a dequantize-then-matmul
    kernel may materialise one); the workspace reserve is 256 MiB + 2x that.
    """
    slot = round_slot(slot_bytes)
    workspace = workspace_bytes(expanded_bytes)
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
                f"{format_bytes(kv_bytes)} + workspace {format_bytes(workspace)} + one layer's top-{top_k} experts "
                f"({top_k} x {format_bytes(slot)}) need at least {format_bytes(need)}"
            )
        gpu_slots = min(gpu_slots, num_keys)
        host_fixed = 0
        host_min = top_k  # pinned staging for one layer's transfers
    else:
        host_fixed = resident_bytes + kv_bytes  # on a CPU the model itself lives in RAM
        host_min = top_k
    host_slots = max(0, (ram_budget - host_fixed) // slot)
    if host_slots < host_min:
        # on CUDA the RAM tier only stages one layer's transfers: no resident weights there
        need = min_budget(slot_bytes=slot, top_k=host_min, resident_bytes=host_fixed)
        # kv_bytes is 0 on a CPU (the KV cache is not part of the slot budget there): do not print "KV cache 0 B"
        kv = f"KV cache {format_bytes(kv_bytes)} + " if kv_bytes else ""
        what = "" if cuda else f"resident weights {format_bytes(resident_bytes)} + {kv}"
        raise MoeLocalError(
            f"--ram {format_bytes(ram_budget)} is too small: {what}one layer's top-{top_k} experts "
            f"({top_k} x {format_bytes(slot)}) need at least {format_bytes(need)}"
        )
    host_slots = min(host_slots, num_keys)
    return BudgetPlan(slot, gpu_budget if cuda else None, ram_budget, resident_bytes, kv_bytes,
                      workspace if cuda else 0, gpu_slots, host_slots)
