"""How many CPU threads a run computes with (`-t/--threads`), and handing that number to the kernels.

The default is the machine's physical cores (hyper-threads share one core's vector units and its
memory bandwidth, so they do not speed up a bandwidth-bound decode), or `OMP_NUM_THREADS` when the
user has set it, as they would for any OpenMP program.

Two pools compute on the CPU: torch's intra-op OpenMP pool (attention, norms, the float matmuls it
still does) and the C kernel pool of `moe_local.formats.kernels_cpu` (the packed / bf16 GEMVs) once
that module exists. Both get `n` threads; `torch_threads` is the one knob that says otherwise (see
benchmarks/dense_decode.py for the measurement of torch with 1 vs 2 threads on this VM).
"""

from __future__ import annotations

import importlib
import os

import torch

from moe_local.errors import MoeLocalError


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


def apply_threads(n: int | None) -> int:
    """Size torch's pool and the C kernel pool (where the kernels module provides a setter) for a run
    with `n` threads; returns the count in effect. None leaves the process's settings as they are
    (a library caller's, or a test's, choice): the CLI always passes a number (`resolve_threads`)."""
    if n is None:
        return torch.get_num_threads()
    torch.set_num_threads(torch_threads(n))
    try:
        kernels = importlib.import_module("moe_local.formats.kernels_cpu")
    except ImportError:  # the C kernels are not in this build: torch computes everything
        kernels = None
    if kernels is not None and hasattr(kernels, "set_threads"):
        kernels.set_threads(n)
    return n


__all__ = ["apply_threads", "default_threads", "parse_threads", "resolve_threads", "torch_threads"]
