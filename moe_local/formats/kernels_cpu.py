"""The CPU kernels (the C extension `moe_local.formats._cpu`, csrc/): fused dequantize + multiply.

Packed weights are multiplied straight from their bytes: a row's codes are converted to float32
in vector registers and multiplied with x, so a weight is read once per token and never expanded
to a float matrix (the torch path expands every expert to float32 on every use). A batch of tokens
is multiplied a few tokens at a time against the codes converted once, so up to `GEMM_MIN_BATCH`
tokens take these kernels; larger batches (a long prompt through a dense weight) dequantize a block
of rows at a time in C into a small float32 scratch and hand it to torch's matmul, which reuses a
weight across many tokens better than the fused kernels do.

`layer_kernel` runs a whole MoE layer (a decode step or a prompt chunk) in one call: the selected experts' gate/up
rows, the activation, the down rows and the weighted sum in ascending expert order, all on the
kernel thread pool. Pointer tables (`expert_row`) are built once per weight and kept on it.

Results do not depend on the thread count (rows are split across threads, a reduction never is),
nor on which experts are computed together (each expert's output is the same whatever else is in
the call, and outputs are summed in ascending expert order). The ISA (AVX-512, AVX2, portable C) is
picked by cpuid at import; `MOE_LOCAL_CPU_ISA=portable|avx2|avx512` forces one.

Without the compiled extension (a checkout that never ran `pip install -e .`) every entry point
returns None and callers keep the torch path; one note says so on first use.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import torch

from moe_local.errors import MoeLocalError
from moe_local.experts import ExpertWeights

try:
    import moe_local.formats._cpu as _cpu
except ImportError:  # not built: the torch path serves (see module docstring)
    _cpu = None

ISA_ENV = "MOE_LOCAL_CPU_ISA"
ISAS = ("portable", "avx2", "avx512")
KINDS = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3, "int4": 4, "nf4": 5, "ternary": 6, "ternary-absmean": 6}
FLOAT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SCALE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ACTIVATIONS = {"silu": 0, "swish": 0, "relu": 1, "gelu": 2, "gelu_pytorch_tanh": 3}
GEMM_MIN_BATCH = 128  # tokens from which linear() dequantizes blocks for torch's matmul (see README, speed)
MOE_SCRATCH_FLOATS = 1 << 24  # 64 MiB: the most scratch one grouped-layer C call allocates
MAX_BATCH = 8192  # tokens one grouped-layer call takes (a prompt chunk; each expert's tokens in blocks of _cpu.MAX_T)
CHUNK_ELEMENTS = 1 << 20  # float32 scratch of the GEMM path (4 MiB): one block of dequantized rows

_state = {"env_checked": False, "noted": False}


def available() -> bool:
    """True when the compiled kernels are importable (and MOE_LOCAL_CPU_ISA, if set, is valid)."""
    if _cpu is None:
        if not _state["noted"]:
            _state["noted"] = True
            sys.stderr.write("note: moe-local's C kernels are not built (pip install -e . compiles them); "
                             "using the slower torch path\n")
        return False
    if not _state["env_checked"]:
        _state["env_checked"] = True
        forced = os.environ.get(ISA_ENV)
        if forced:
            set_isa(forced)
    return True


def set_threads(n: int) -> None:
    """Size of the kernel thread pool (the caller counts itself). `-t/--threads` sets it; torch's
    own intra-op threads are the session's business."""
    if int(n) < 1:
        raise MoeLocalError(f"threads must be at least 1, got {n}")
    if _cpu is not None:
        _cpu.set_threads(int(n))


def threads() -> int:
    return _cpu.threads() if _cpu is not None else 1


def isa() -> str:
    """The kernel path in use: avx512, avx2, portable, or torch (extension not built)."""
    return _cpu.isa() if available() else "torch"


def isas() -> list[str]:
    """Every kernel path this CPU can run (tests run each against the reference)."""
    return list(_cpu.isas()) if _cpu is not None else []


def set_isa(name: str) -> None:
    if _cpu is None:
        raise MoeLocalError(f"{ISA_ENV}={name}: the C kernels are not built")
    if name not in ISAS:
        raise MoeLocalError(f"{ISA_ENV} must be one of {', '.join(ISAS)}, got {name!r}")
    if name not in _cpu.isas():
        raise MoeLocalError(f"{ISA_ENV}={name}: this CPU does not support it (supported: {', '.join(_cpu.isas())})")
    _cpu.set_isa(name)


# ---------------------------------------------------------------------------------- descriptors
def _row_major(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t as [rows, n] with unit inner stride (a view when it already is one)."""
    t = t.reshape(rows, -1) if t.is_contiguous() else t
    if t.dim() != 2 or t.stride(-1) != 1:
        t = t.reshape(rows, -1).contiguous()
    return t


def _describe(w) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """(int64 descriptor, tensors it points into) of a float tensor or PackedWeight; None when the
    kernels do not cover it (a scheme they do not know, a GPU tensor)."""
    if isinstance(w, torch.Tensor):
        if w.device.type != "cpu" or w.dtype not in FLOAT_KINDS or w.dim() != 2:
            return None
        rows, cols = w.shape
        t = _row_major(w, rows)
        d = [FLOAT_KINDS[w.dtype], rows, cols, cols, t.data_ptr(), t.stride(0) * t.element_size(), 0, 0, 0, 0]
        return torch.tensor(d, dtype=torch.int64), [t]
    scheme, packed, shape = getattr(w, "scheme", None), getattr(w, "packed", None), getattr(w, "shape", None)
    if scheme is None or packed is None or scheme.name not in KINDS or w.device.type != "cpu":
        return None
    rows, cols = int(shape[0]), int(shape[1])
    kind = KINDS[scheme.name]
    if kind <= 2:
        return _describe(packed["weight"].reshape(rows, cols))
    g = int(scheme.group_size_for(cols))
    codes = _row_major(packed["codes"], rows)
    scales = packed["scales"].reshape(rows, -1).contiguous()
    if scales.dtype not in SCALE_DTYPES or scales.shape[1] != -(-cols // g):
        return None
    keep = [codes, scales]
    zeros = 0
    if kind == KINDS["int4"]:
        z = packed["zeros"].reshape(rows, -1).contiguous()
        keep.append(z)
        zeros = z.data_ptr()
    d = [kind, rows, cols, g, codes.data_ptr(), codes.stride(0), scales.data_ptr(), SCALE_DTYPES[scales.dtype], zeros, 0]
    return torch.tensor(d, dtype=torch.int64), keep


def descriptor(w) -> torch.Tensor | None:
    """The int64 descriptor the C kernels read, built once and kept on the weight (with the
    tensors it points into, so they live as long as it does)."""
    cached = getattr(w, "_cpu_desc", None)
    if cached is not None:
        return cached
    made = _describe(w)
    if made is None:
        return None
    desc, keep = made
    try:
        w._cpu_desc, w._cpu_keep, w._cpu_dims = desc, keep, (int(desc[1]), int(desc[2]))
    except AttributeError:  # an object that takes no attributes: describe it on every call
        pass
    return desc


# ---------------------------------------------------------------------------------- one weight
def linear(x: torch.Tensor, w) -> torch.Tensor | None:
    """`x @ W.T` in x's dtype through the C kernels, or None when they do not apply (not built,
    not on the CPU, a scheme they do not cover) and the caller's torch path should run."""
    if x.device.type != "cpu" or not available():
        return None
    desc = descriptor(w)
    if desc is None:
        return None
    dims = getattr(w, "_cpu_dims", None)  # Python ints: no tensor reads on the per-token path
    rows, cols = dims if dims is not None else (int(desc[1]), int(desc[2]))
    if x.shape[-1] != cols:
        raise ValueError(f"linear: x has {x.shape[-1]} features, the weight takes {cols}")
    lead = x.shape[:-1]
    xf = x.reshape(-1, cols)
    if xf.dtype != torch.float32 or not xf.is_contiguous():
        xf = xf.to(torch.float32).contiguous()
    T = xf.shape[0]
    if T == 0:
        return x.new_zeros(*lead, rows)
    if T < GEMM_MIN_BATCH:
        y = torch.empty(T, rows, dtype=torch.float32)
        _cpu.linear(desc.data_ptr(), xf.data_ptr(), T, y.data_ptr())
    else:  # GEMM path: dequantize a block of rows in C, multiply with torch
        block = max(1, min(rows, CHUNK_ELEMENTS // max(1, cols)))
        scratch = torch.empty(block, cols, dtype=torch.float32)
        parts = []
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            _cpu.dequant(desc.data_ptr(), r0, r1, scratch.data_ptr())
            parts.append(xf @ scratch[: r1 - r0].t())
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    y = y.reshape(*lead, rows)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


# ---------------------------------------------------------------------------------- a MoE layer
def expert_row(e: ExpertWeights) -> torch.Tensor | None:
    """int64 [3 * DESC_N]: gate, up, down descriptors of one SwiGLU expert (kept on it), or None
    when one projection is not covered or the shapes do not chain."""
    cached = getattr(e, "_cpu_row", None)
    if cached is not None:
        return cached
    if not available() or any(b is not None for b in e.biases):  # biased experts (gpt-oss): generic loop
        return None
    descs = [descriptor(w) for w in (e.gate, e.up, e.down)]
    if any(d is None for d in descs):
        return None
    g, u, d = descs
    if int(g[1]) != int(u[1]) or int(g[2]) != int(u[2]) or int(d[2]) != int(g[1]) or int(d[1]) != int(g[2]):
        return None
    row = torch.cat(descs)
    e._cpu_row = row
    return row


def grouped_applies(x: torch.Tensor, act: str) -> bool:
    """Whether a layer call on x takes the grouped kernel: any decode step or prompt chunk on the CPU."""
    return (x.device.type == "cpu" and 0 < x.shape[0] <= MAX_BATCH and isinstance(act, str) and act in ACTIVATIONS
            and available())


def moe_accumulate(out: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   table: torch.Tensor, table_ids: torch.Tensor | None, act: str) -> None:
    """out [T, H] float32 += the routed experts of x that `table` holds, ascending expert id.

    table: int64 [n, 3 * DESC_N] (expert_row); table_ids: int64 [n] ascending expert ids of its
    rows (None: row i is expert i). Calling this once with every expert or once per expert in
    ascending order gives bitwise identical `out`."""
    T, H = x.shape
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    ids_c = ids.to(torch.int64).contiguous()
    w_c = weights.to(torch.float32).contiguous()
    k = ids.shape[-1]
    inter = int(table[0, 1])  # the gate's rows
    # the C call's scratch holds ~(3H + 4I) floats per routed pair: a long prompt chunk goes in
    # slices of tokens (each token's result does not depend on the slice)
    step = max(1, MOE_SCRATCH_FLOATS // (k * (3 * H + 4 * inter)))
    tid = 0 if table_ids is None else table_ids.data_ptr()
    for t0 in range(0, T, step):
        n = min(step, T - t0)
        _cpu.moe(out[t0:].data_ptr(), xf[t0:].data_ptr(), n, ids_c[t0:].data_ptr(), w_c[t0:].data_ptr(), k,
                 table.data_ptr(), tid, table.shape[0], ACTIVATIONS[act])


class LayerKernel:
    """One MoE layer's experts as a pointer table: `__call__(x, ids, weights)` is the whole layer
    in one C call (None for batches it does not take: the caller's generic loop runs them)."""

    def __init__(self, table: torch.Tensor, act: str, keep: Sequence[ExpertWeights]) -> None:
        self.table = table
        self.act = act
        self._keep = list(keep)  # the weights the table points into

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        if not grouped_applies(x, self.act):
            return None
        out = torch.zeros(x.shape, dtype=torch.float32)
        moe_accumulate(out, x, ids, weights, self.table, None, self.act)
        return out if x.dtype == torch.float32 else out.to(x.dtype)


def layer_kernel(experts: Sequence[ExpertWeights], act) -> LayerKernel | None:
    """The grouped kernel over experts 0..n-1 of a layer, or None when the kernels do not cover
    them (not built, an activation or a projection they do not know, weights off the CPU)."""
    if not isinstance(act, str) or act not in ACTIVATIONS or not experts or not available():
        return None
    rows = [expert_row(e) for e in experts]
    if any(r is None for r in rows):
        return None
    return LayerKernel(torch.stack(rows), act, experts)


__all__ = ["available", "set_threads", "threads", "isa", "isas", "set_isa", "linear", "descriptor",
           "expert_row", "grouped_applies", "moe_accumulate", "layer_kernel", "LayerKernel", "MAX_BATCH", "GEMM_MIN_BATCH"]
