"""The options `generate` and `chat` share, declared once as Typer `Annotated` types.

A command lists the ones it takes in its own signature (Typer reads nothing else), with the
default beside each, and hands them to `sampling_options` / `load_options`, which build the
runtime's objects and check them before anything is loaded. The checks themselves live with those
objects in moe_local/runtime, so every front end (this CLI, the server) refuses the same input
with the same words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moe_local.cache.options import CacheOptions
from moe_local.runtime.generate import GenerateOptions
from moe_local.runtime.loader import LoadOptions
from moe_local.runtime.sampling import SamplingOptions

SAMPLING, LOADING, CACHE = "Sampling", "Model loading", "Expert cache"

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="A model folder, or a Hugging Face repo id (org/name).")]

# ---------------------------------------------------------------------------- sampling
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", rich_help_panel=SAMPLING, help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option(rich_help_panel=SAMPLING, help="0 = greedy.")]
TopK = Annotated[int, typer.Option(rich_help_panel=SAMPLING, help="Keep the k most likely tokens (0 = off).")]
TopP = Annotated[float, typer.Option(rich_help_panel=SAMPLING,
                                     help="Nucleus: smallest set with this much probability (1 = off).")]
MinP = Annotated[float, typer.Option(rich_help_panel=SAMPLING,
                                     help="Drop tokens below min-p x the top probability (0 = off).")]
RepeatPenalty = Annotated[float, typer.Option(rich_help_panel=SAMPLING, help="llama.cpp repetition penalty (1 = off).")]
RepeatLastN = Annotated[int, typer.Option(rich_help_panel=SAMPLING, help="Recent tokens the penalty looks at (-1 = all).")]
Seed = Annotated[Optional[int], typer.Option(rich_help_panel=SAMPLING, help="Random seed (same seed, same tokens).")]
IgnoreEos = Annotated[bool, typer.Option("--ignore-eos", rich_help_panel=SAMPLING,
                                         help="Do not stop at end-of-sequence tokens.")]
Stop = Annotated[Optional[list[str]], typer.Option("--stop", rich_help_panel=SAMPLING,
                                                   help="Stop before this text (repeatable).")]

# ---------------------------------------------------------------------------- loading and the expert cache
Device = Annotated[Optional[str], typer.Option(rich_help_panel=LOADING,
                                               help="cpu | cuda | cuda:N (default: cuda if available)")]
DType = Annotated[Optional[str], typer.Option(rich_help_panel=LOADING,
                                              help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")]
Threads = Annotated[Optional[str], typer.Option("--threads", "-t", metavar="N", rich_help_panel=LOADING,
                                                help="CPU threads to compute with (default: OMP_NUM_THREADS if set, "
                                                     "else the physical cores).")]
Experts = Annotated[str, typer.Option(rich_help_panel=CACHE, help="tiered: page routed experts through the RAM/GPU "
                                      "cache; resident: load them all up front.")]
GpuMem = Annotated[Optional[str], typer.Option("--gpu-mem", rich_help_panel=CACHE,
                                               help="GPU budget, e.g. 6GiB (default: free GPU memory minus headroom).")]
Ram = Annotated[Optional[str], typer.Option(rich_help_panel=CACHE, help="Host RAM budget for expert slots, e.g. 16GiB "
                                            "(default: half the available RAM).")]
Policy = Annotated[str, typer.Option(rich_help_panel=CACHE,
                                     help="Eviction: lru | lfu-aging | arc | belady (belady needs --belady-trace).")]
PrefetchDepth = Annotated[int, typer.Option(rich_help_panel=CACHE,
                                            help="Prefetch experts predicted by the next D layers' routers (0 = off).")]
PrefetchExtra = Annotated[int, typer.Option(rich_help_panel=CACHE,
                                            help="Spare experts prefetched beyond each predicted top-k.")]
Miss = Annotated[str, typer.Option(rich_help_panel=CACHE, help="On a GPU miss: transfer | cpu (compute it from RAM) | auto.")]
TraceFile = Annotated[Optional[Path], typer.Option(rich_help_panel=CACHE, help="Write the routing trace (layer and "
                                                   "experts per token) to FILE, for `moe-local simulate`.")]
BeladyTrace = Annotated[Optional[Path], typer.Option(rich_help_panel=CACHE, help="A trace of this same run, recorded "
                                                     "earlier: the future --policy belady evicts by.")]
StatsJson = Annotated[Optional[Path], typer.Option(rich_help_panel=CACHE, help="Write the run report (timings, cache "
                                                   "hits per tier and layer, prefetch, bytes moved) to FILE.")]


def sampling_options(max_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float,
                     repeat_penalty: float, repeat_last_n: int, seed: int | None, ignore_eos: bool,
                     stop: list[str] | None) -> GenerateOptions:
    """The sampling flags as the generator's options, checked now (not after the model has loaded)."""
    gen = GenerateOptions(SamplingOptions(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed),
                          max_tokens=max_tokens, stop=list(stop or []), ignore_eos=ignore_eos)
    gen.validate()
    return gen


def load_options(device: str | None, dtype: str | None, experts: str, gpu_mem: str | None, ram: str | None,
                 policy: str, prefetch_depth: int, prefetch_extra: int, miss: str, trace: Path | None,
                 belady_trace: Path | None, threads: str | None = None) -> LoadOptions:
    """The loading and cache flags as the loader's options, checked now (before anything is read)."""
    load = LoadOptions(device, dtype, experts, CacheOptions(
        gpu_mem=gpu_mem, ram=ram, policy=policy, prefetch_depth=prefetch_depth, prefetch_extra=prefetch_extra,
        miss=miss, trace=trace, belady_trace=belady_trace), threads=threads)
    load.check()
    return load
