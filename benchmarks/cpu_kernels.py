"""CPU matmul candidates for packed weights, side by side (the measurement behind csrc/).

    python benchmarks/cpu_kernels.py                      # 14336x4096 and 768x2048, batch 1 and 16..512
    python benchmarks/cpu_kernels.py --batches 1 16 --threads 1 2 --json out.json

For each shape, batch and thread count, the median (and min..max) time of
  deq+mm        dequantize the whole weight to float32 (the schemes' reference), then F.linear
  torch-path    the schemes' torch path before the C kernels (chunked expand + matmul)
  int8pack_mm   torch._weight_int8pack_mm (int8 per channel, bf16 scales) with fp32 x
  int4pack_mm   torch._weight_int4pack_mm_for_cpu (int4 g64, bf16 x: the op wants bf16)
  c-<isa>       our C kernels (moe_local.formats._cpu) on every ISA path the CPU has
with GB/s = packed bytes read / time (the roofline at batch 1 is the memory bandwidth).
Timings on a shared machine are noisy: the runs of a case alternate between candidates and the
spread is printed; `--clock thread` times the calling thread's CPU time instead of the wall
clock (meaningful with 1 thread on a machine other processes load). Prints a table and writes JSON (default benchmarks/results/cpu_kernels.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_local.formats import kernels_cpu
from moe_local.formats.schemes import PackedWeight, get_scheme

SCHEMES = [("int4", {"group_size": 64}), ("int8", {}), ("bf16", {})]


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def timed(fn, reps: int, clock=time.perf_counter) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def candidates(name: str, pw: PackedWeight, x: torch.Tensor) -> dict:
    """name -> zero-argument callable computing x @ W.T."""
    shape = pw.shape
    c = {
        "deq+mm": lambda: F.linear(x, pw.dequantize()),
        "torch-path": lambda: pw.scheme.linear(x, pw.packed, shape),
    }
    if name == "int8":
        codes = pw.packed["codes"].reshape(shape)
        scales = pw.packed["scales"].reshape(-1).to(torch.bfloat16)
        c["int8pack_mm"] = lambda: torch._weight_int8pack_mm(x.to(torch.bfloat16), codes, scales)
    if name == "int4":
        try:
            w = pw.dequantize()
            q = (pw.scheme.unpack_codes(pw.packed, shape).to(torch.int32)).contiguous()
            packed4 = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            s = pw.packed["scales"].float().reshape(shape[0], -1)
            z = pw.packed["zeros"].float().reshape(shape[0], -1)
            # torch's op: w = (q - 8) * scale + zero_point  per group; ours: (q - z) * s
            sz = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            xb = x.to(torch.bfloat16)
            c["int4pack_mm"] = lambda: torch._weight_int4pack_mm_for_cpu(xb, packed4, 64, sz)
            del w
        except Exception as e:  # noqa: BLE001 -- an op missing from this torch build is a result too
            print(f"  int4pack_mm unavailable: {type(e).__name__}: {e}")
    for isa in kernels_cpu.isas():
        def run(isa=isa):
            kernels_cpu.set_isa(isa)
            return kernels_cpu.linear(x, pw)
        c[f"c-{isa}"] = run
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["14336x4096", "768x2048"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 512])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="thread: CPU time of the calling thread (1 thread only; robust to a loaded machine)")
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "cpu_kernels.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape_s in args.shapes:
        out_f, in_f = (int(v) for v in shape_s.split("x"))
        w = torch.randn(out_f, in_f) * 0.02
        for name, params in SCHEMES:
            scheme = get_scheme(name, **params)
            pw = PackedWeight(scheme, scheme.quantize(w), (out_f, in_f))
            nbytes = pw.nbytes
            for T in args.batches:
                x = torch.randn(T, in_f)
                for th in args.threads:
                    torch.set_num_threads(th)
                    kernels_cpu.set_threads(th)
                    cands = candidates(name, pw, x)
                    times: dict[str, list[float]] = {k: [] for k in cands}
                    for _ in range(args.reps):  # alternate candidates rep by rep
                        for k, fn in cands.items():
                            times[k] += timed(fn, 1, CLOCKS[args.clock])
                    for k, ts in times.items():
                        med = statistics.median(ts)
                        rows.append({"shape": shape_s, "scheme": name, "batch": T, "threads": th, "candidate": k,
                                     "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                                     "gb_s": nbytes / med / 1e9})
                        r = rows[-1]
                        print(f"{shape_s:>11} {name:>5} T={T:<4} t={th} {k:>12}: {r['median_ms']:9.3f} ms "
                              f"[{r['min_ms']:.3f}..{r['max_ms']:.3f}]  {r['gb_s']:6.2f} GB/s", flush=True)
    meta = {"clock": args.clock, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "load_avg": os.getloadavg(), "isas": kernels_cpu.isas()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(args.json)
    print(f"wrote {args.json} (load average {meta['load_avg'][0]:.1f})")


if __name__ == "__main__":
    main()
