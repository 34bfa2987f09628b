"""CPU compute of routed experts inside the tiered cache: the grouped C kernel path, `--miss cpu`
experts, and the start-up calibration that decides `--miss auto`.

Why apart from tiered.py: none of this moves bytes between tiers; it only decides *where* an expert
is multiplied. Each piece takes its inputs explicitly (the source, the slot weights, a fetch
function), so the orchestrator keeps only the order of the calls.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from moe_local.errors import MoeLocalError
from moe_local.experts import ExpertWeights
from moe_local.formats import kernels_cpu


class CpuExpert:
    """An expert computed on the CPU from its RAM copy (`--miss cpu`): x moves, the weights do not."""

    def __init__(self, weights: ExpertWeights) -> None:
        self.weights = weights

    def __call__(self, x: torch.Tensor, act) -> torch.Tensor:
        return self.weights(x.to("cpu", torch.float32), act).to(x.device, x.dtype)


class GroupedCpu:
    """Whether a layer call goes through the grouped C kernel, and the call itself.

    CPU compute of a decode-sized batch goes through the grouped C kernel, exactly as
    ResidentExperts over the same source does (so tokens cannot depend on what is cached)."""

    def __init__(self, source, device: torch.device, dtype: torch.dtype | None, act_name) -> None:
        self.source = source
        self.device = device
        self.dtype = dtype
        self.act_name = act_name  # a name (or a gated activation object the grouped kernel declines)
        self.covered: dict[int, bool] = {}  # layer -> its experts' layout fits the kernel

    def applies(self, layer: int, x: torch.Tensor) -> bool:
        if self.device.type != "cpu" or not kernels_cpu.grouped_applies(x, self.act_name):
            return False
        if layer not in self.covered:
            sample = self.source.decode(self.source.view(layer, 0), layer, 0).to(self.device, self.dtype)
            self.covered[layer] = kernels_cpu.expert_row(sample) is not None
        return self.covered[layer]

    def combine(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                experts: Sequence[int], fetch: Callable[[int], object], one_call: bool) -> torch.Tensor:
        """The layer through kernels_cpu.moe_accumulate: one call when every expert was already in
        its slot (`one_call`: the decode steady state), else one call per expert as it arrives (its
        slot may be reused by a later one). Both sum in ascending expert order: bitwise the same."""
        out = torch.zeros(x.shape, dtype=torch.float32)
        rows, alive = [], []
        for e in experts:
            w = fetch(e)
            w = w.weights if isinstance(w, CpuExpert) else w
            row = kernels_cpu.expert_row(w)
            if row is None:
                raise MoeLocalError(f"layer {layer} expert {e}: its layout differs from expert 0's")
            if one_call:
                rows.append(row)
                alive.append(w)  # a row holds raw pointers: a converted copy must outlive the call
            else:
                kernels_cpu.moe_accumulate(out, x, ids, weights, row[None], torch.tensor([e]), self.act_name)
        if one_call:
            kernels_cpu.moe_accumulate(out, x, ids, weights, torch.stack(rows), torch.tensor(list(experts)),
                                       self.act_name)
        return out if x.dtype == torch.float32 else out.to(x.dtype)


def calibrate_miss(source, layer: int, hbuf: torch.Tensor, device: torch.device, act) -> dict[str, float]:
    """`--miss auto`: time one expert's RAM -> GPU copy against computing it on the CPU.

    hbuf: a pinned RAM slot to stage the expert in (its bytes are overwritten)."""
    n = source.expert_nbytes(layer, 0)
    hbuf = hbuf[:n]
    source.read_into(layer, 0, hbuf, verify=True)
    bw = measure_h2d_bandwidth(n, device, hbuf)
    w = source.decode(hbuf, layer, 0).to("cpu", torch.float32)
    x = torch.randn(1, w.down.shape[0])
    w(x, act)
    t0 = time.perf_counter()
    for _ in range(3):
        w(x, act)
    cpu_s = (time.perf_counter() - t0) / 3
    return {"h2d_bytes_per_s": bw, "cpu_expert_s": cpu_s, "transfer_expert_s": n / bw}


def measure_h2d_bandwidth(nbytes: int, device: torch.device, src: torch.Tensor | None = None, reps: int = 5) -> float:
    """Pinned host -> device bytes/s, timed with CUDA events (the roofline's denominator)."""
    src = src if src is not None else torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    end.record()
    torch.cuda.synchronize(device)
    del dst
    return nbytes * reps / (start.elapsed_time(end) / 1000.0)
