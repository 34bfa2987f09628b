"""How many CPU threads a run computes with (`-t/--threads`), and handing that number to the kernels.

The default is the machine's physical cores (hyper-threads share one core's vector units and its
memory bandwidth, so they do not speed up a bandwidth-bound decode), or `OMP_NUM_THREADS` when the
user has set it, as they would for any OpenMP program.

Two pools compute on the CPU: torch's intra-op OpenMP pool (attention, norms, the float matmuls it
still does, prefill's GEMMs) and the C kernel pool of `moe_local.formats.kernels_cpu` (the packed
and bf16 GEMVs). Both get `n` threads. They take turns, so they do not
compete as long as an idle OpenMP thread sleeps instead of spinning: the CLI makes OpenMP wait
passively (moe_local/cli/__init__.py), and with that a second thread doubled decode speed where
spinning made it 15x slower (benchmarks/dense_decode.py: 0.34 tok/s at 1 thread, 0.76 at 2
passive, 0.02 at 2 spinning, on the 2-core VM under load). `torch_threads` is the one place that
would give torch fewer.
"""

from __future__ import annotations

import os

import torch

from moe_local.errors import MoeLocalError
from moe_local.formats import kernels_cpu


def default_threads() -> int:
    """OMP_NUM_THREADS when set to a positive integer, else the physical cores (logical if unknown)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def parse_threads(value: str | int | None) -> int | None:
    """A `--threads` value as a positive int (None: the default); anything else one line naming the flag."""
    if value is None:
        return None
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise MoeLocalError(f"-t/--threads must be a positive integer (threads to compute with), got {value!r}")
    return int(text)


def resolve_threads(value: str | int | None) -> int:
    """What a front end runs with: the `--threads` value, or `default_threads()` when it is None."""
    n = parse_threads(value)
    return default_threads() if n is None else n


def torch_threads(n: int) -> int:
    """Threads for torch's own intra-op pool when the run computes with `n`."""
    return n


SMALL_BATCH = 16  # tokens below which a forward's torch ops run on one thread


def threads_for_batch(tokens: int, n: int, device: torch.device) -> None:
    """Size torch's pool for a forward over `tokens` tokens on `device` in a run with `n` threads
    (a GPU run's host ops are left as they are).

    A decode step's torch ops (norms, rope, attention of one query, the router) take microseconds:
    the matmuls are the kernel pool's, on all n threads. A second OpenMP thread there costs more
    than it saves, and while the kernel pool's worker still holds the other core it can stall an op
    for milliseconds. A prompt's torch ops (attention over many queries, the GEMM path) get all n.
    Changes torch's setting only when the batch crosses SMALL_BATCH, not per token."""
    if device.type != "cpu":
        return
    want = 1 if tokens < SMALL_BATCH else n
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


def apply_threads(n: int | None) -> int:
    """Size torch's pool and the C kernel pool (where the kernels module provides a setter) for a run
    with `n` threads; returns the count in effect. None leaves the process's settings as they are
    (a library caller's, or a test's, choice): the CLI always passes a number (`resolve_threads`)."""
    if n is None:
        return torch.get_num_threads()
    torch.set_num_threads(torch_threads(n))
    kernels_cpu.set_threads(n)  # a no-op where the C extension was not built (torch computes everything)
    return n


__all__ = ["apply_threads", "threads_for_batch", "default_threads", "parse_threads", "resolve_threads", "torch_threads"]
