"""Batch-1 decode cost of each quantization scheme's `linear` vs dequantize-then-matmul.

    python benchmarks/quant_kernels.py                      # Mixtral expert shape 14336x4096
    python benchmarks/quant_kernels.py --out 3584 --in 1024 --json bench.json

For every scheme: quantize one Gaussian weight, keep it packed on the device, and time
  linear      scheme.linear(x, packed)  (the kernel the expert seam calls; chunked torch path, or
              the fused Triton GEMV where it applies and MOE_LOCAL_FUSED_GEMV=1 is set)
  deq+mm      F.linear(x, scheme.dequantize(packed).to(dtype))  (the naive path)
  fused       the Triton GEMV directly (int4 / ternary on CUDA with Triton only)
plus a dense bf16/fp32 F.linear on an already-expanded weight, the floor every packed kernel
chases at batch 1 (memory-bound: bytes read / time = GB/s in the table). Prints a rich table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from moe_local.formats import get_scheme
from moe_local.formats import kernels_triton

SCHEMES = [
    ("bf16", {}),
    ("int8", {}),
    ("int4", {"group_size": 64}),
    ("nf4", {"group_size": 64}),
    ("mxfp4", {}),  # gpt-oss's expert format (block 32, e8m0 scales)
    ("ternary", {"group_size": 128}),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, repeat: int, warmup: int = 2) -> tuple[float, float]:
    """(best, median) seconds of `repeat` calls after warm-up, synchronised on CUDA. The table shows
    the best: the least noisy figure on a shared machine; the JSON keeps both."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=int, default=14336, help="output features (Mixtral w1/w3: 14336)")
    ap.add_argument("--in", dest="in_f", type=int, default=4096, help="input features (Mixtral hidden: 4096)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="activation dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--schemes", default=",".join(n for n, _ in SCHEMES))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None,
                    help="result file (default: benchmarks/results/quant_kernels_<device>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shape = (args.out, args.in_f)
    console = Console()
    if not console.is_terminal:  # piped into a log: do not squeeze the table into 80 columns
        console = Console(width=140)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    x = torch.randn(1, args.in_f, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    dense = w.to(device, dtype)
    dense_s, _ = timeit(lambda: F.linear(x, dense), device, args.repeat)
    dense_bytes = dense.numel() * dense.element_size()
    del dense

    rows = []
    wanted = set(args.schemes.split(","))
    for name, params in SCHEMES:
        if name not in wanted:
            continue
        scheme = get_scheme(name, **params)
        t0 = time.perf_counter()
        packed = {k: v.to(device) for k, v in scheme.quantize(w).items()}
        quant_s = time.perf_counter() - t0
        nbytes = scheme.nbytes(shape)
        linear_s, linear_med = timeit(lambda: scheme.linear(x, packed, shape), device, args.repeat)
        deq_s, deq_med = timeit(lambda: F.linear(x, scheme.dequantize(packed, shape).to(dtype)), device, args.repeat)
        fused_s = None
        if device.type == "cuda" and kernels_triton.available(x) and name in ("int4", "ternary"):  # not the interpreter
            g = scheme.group_size_for(shape[1])  # narrow rows use a smaller group
            if name == "int4":
                fn = lambda: kernels_triton.int4_gemv(x, packed["codes"], packed["scales"], packed["zeros"], shape, g)
            else:
                fn = lambda: kernels_triton.ternary_gemv(x, packed["codes"], packed["scales"], shape, g)
            ref = F.linear(x.float(), scheme.dequantize(packed, shape))
            err = float((fn().float() - ref).abs().max() / ref.abs().max())
            console.print(f"{name}: fused GEMV max error vs reference {err:.2e}")
            fused_s, _ = timeit(fn, device, args.repeat)
        rows.append({
            "scheme": name, "params": scheme.params, "bits_per_weight": scheme.bits_per_weight(shape),
            "packed_bytes": nbytes, "quantize_s": quant_s, "linear_ms": linear_s * 1e3,
            "dequant_matmul_ms": deq_s * 1e3, "fused_ms": None if fused_s is None else fused_s * 1e3,
            "linear_gbps": nbytes / linear_s / 1e9,
            "linear_median_ms": linear_med * 1e3, "dequant_matmul_median_ms": deq_med * 1e3,
        })
        del packed

    table = Table(title=f"batch-1 linear, W {shape[0]}x{shape[1]}, x {str(dtype).replace('torch.', '')} "
                        f"on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'})")
    for col in ("scheme", "bits/w", "packed MB", "linear ms", "deq+mm ms", "fused ms", "linear GB/s", "quantize s"):
        table.add_column(col, justify="left" if col == "scheme" else "right")
    table.add_row(f"dense {str(dtype).replace('torch.', '')}", f"{8 * dense_bytes / (shape[0] * shape[1]):.0f}",
                  f"{dense_bytes / 1e6:.1f}", f"{dense_s * 1e3:.3f}", "-", "-", f"{dense_bytes / dense_s / 1e9:.1f}", "-")
    for r in rows:
        table.add_row(
            r["scheme"], f"{r['bits_per_weight']:.3f}", f"{r['packed_bytes'] / 1e6:.1f}", f"{r['linear_ms']:.3f}",
            f"{r['dequant_matmul_ms']:.3f}", "-" if r["fused_ms"] is None else f"{r['fused_ms']:.3f}",
            f"{r['linear_gbps']:.1f}", f"{r['quantize_s']:.2f}",
        )
    console.print(table)
    result = {
        "shape": list(shape), "device": str(device), "dtype": str(dtype), "torch": torch.__version__,
        "triton": kernels_triton.HAVE_TRITON, "repeat": args.repeat, "threads": torch.get_num_threads(),
        "timing": "best of repeat (medians alongside)",
        "dense_ms": dense_s * 1e3, "dense_bytes": dense_bytes, "schemes": rows,
    }
    if args.json is None:
        args.json = Path(__file__).resolve().parent / "results" / f"quant_kernels_{device.type}.json"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(args.json.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.json)
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
