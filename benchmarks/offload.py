"""Offload benchmark: decode through the tiered expert cache under fixed GPU budgets.

What it measures: the routed-expert part of batch-1 decode -- for every token and every MoE layer,
`TieredExperts.forward` on the token's hidden state with that layer's top-k experts -- because that
is the part the cache changes (attention, norms and the KV cache are resident and the same for
every configuration). Experts are a full-size synthetic INT4 store (moe_local.formats' int4 scheme,
group 64; random codes and scales), laid out like a pack (one 4096-aligned range per expert,
CRC-32 checked on every read) and generated on the fly into a temporary directory that is deleted
afterwards (never committed). Shapes:

    mixtral : Mixtral-8x7B experts  (hidden 4096, expert 14336, 8 experts, top-2, 32 layers; ~96 MiB/expert)
    qwen3   : Qwen3-30B-A3B experts (hidden 2048, expert 768, 128 experts, top-8, 48 layers; ~2.4 MiB/expert)

Routing: `synthetic` (per-layer Zipf popularity + reuse of the previous token's experts, seeded) or
`--replay TRACE` (a recorded `moe-local` routing trace, e.g. of the shared trained model:
`--record-shared` writes one by running ../shared/models/pycode-deepseek over its held-out ids).
Trace layers and ids are mapped onto the benchmark's shape (layer i <- trace layer i mod n,
expert e <- e mod E), so routing locality is real even where sizes differ.

Columns: tokens/s (expert part only), effective hit rate, bytes moved per token (disk->RAM +
RAM->GPU), the link bandwidth measured in the same run (pinned host->device with CUDA; a RAM copy
without), and the roofline = link bandwidth / bytes per token (the tokens/s the link alone allows).
Baseline: transformers + accelerate `device_map` offload -- measured only when `accelerate` is
installed, otherwise the row says so; a measured `no-cache` row (slots = top-k, every expert
moved for every use) shows what offloading without a cache costs.

    python benchmarks/offload.py                         # GPU: both shapes, budgets 8 and 16 GiB
    python benchmarks/offload.py --shape qwen3 --layers 8 --tokens 64
    python benchmarks/offload.py --replay run.trace.jsonl --json out.json
    python benchmarks/offload.py --cpu-smoke             # tiny shapes, seconds, CPU only (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_local.cache.adapters import FixedSizeBytes
from moe_local.cache.budget import plan_budget, round_slot
from moe_local.cache.cpu_compute import measure_h2d_bandwidth
from moe_local.units import MiB, format_bytes, parse_size
from moe_local.cache.tiered import TieredExperts
from moe_local.errors import CheckpointError, MoeLocalError
from moe_local.experts import ExpertWeights

ALIGN = 4096
TENSOR_ALIGN = 16


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int
    layers: int


SHAPES = {
    "mixtral": Shape("mixtral-8x7b", 4096, 14336, 8, 2, 32),
    "qwen3": Shape("qwen3-30b-a3b", 2048, 768, 128, 8, 48),
}
SMOKE_SHAPES = {
    "mixtral": Shape("mixtral-tiny", 128, 256, 8, 2, 3),
    "qwen3": Shape("qwen3-tiny", 128, 64, 32, 4, 3),
}


# --------------------------------------------------------------------------- synthetic INT4 store
class SyntheticInt4Store(FixedSizeBytes):
    """An ExpertBytesSource of random INT4 experts in one file: one aligned range per expert."""

    def __init__(self, directory: Path, shape: Shape, group_size: int = 64, progress=None, seed: int = 0) -> None:
        from moe_local.formats.schemes import get_scheme

        self.shape = shape
        self.scheme = get_scheme("int4", group_size=group_size)
        self.moe_layers = list(range(shape.layers))
        self.num_experts = shape.experts
        self.proj_shapes = {"gate": (shape.inter, shape.hidden), "up": (shape.inter, shape.hidden),
                            "down": (shape.hidden, shape.inter)}
        self.layout = []  # (proj, name, offset, shape, dtype)
        off = 0
        for proj, pshape in self.proj_shapes.items():
            for name, (tshape, dtype) in self.scheme.tensor_specs(pshape).items():
                off = -(-off // TENSOR_ALIGN) * TENSOR_ALIGN
                n = int(np.prod(tshape)) * torch.empty((), dtype=dtype).element_size()
                self.layout.append((proj, name, off, tuple(tshape), dtype, n))
                off += n
        self.nbytes = off
        self.stride = -(-off // ALIGN) * ALIGN
        self.path = directory / "experts.bin"
        self.crc: dict[tuple[int, int], int] = {}
        self._write(progress, seed)
        self.fd = os.open(self.path, os.O_RDONLY)

    def _expert_bytes(self, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        buf = np.zeros(self.stride, dtype=np.uint8)
        for proj, name, off, tshape, dtype, n in self.layout:
            if dtype.is_floating_point:  # scales: small positive values (random bytes could be NaN)
                vals = torch.from_numpy(rng.uniform(0.002, 0.02, size=int(np.prod(tshape))).astype(np.float32))
                buf[off : off + n] = vals.to(dtype).view(torch.uint8).numpy()
            else:  # codes and zero points: any byte is a valid pair of 4-bit codes
                start = int(rng.integers(0, max(1, pool.size - n)))
                buf[off : off + n] = pool[start : start + n]
        return buf

    def _write(self, progress, seed: int) -> None:
        rng = np.random.default_rng(seed)
        pool = rng.integers(0, 256, size=min(256 * MiB, 2 * self.stride + MiB), dtype=np.uint8)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for layer in self.moe_layers:
                for e in range(self.num_experts):
                    buf = self._expert_bytes(pool, rng)
                    self.crc[(layer, e)] = zlib.crc32(buf[: self.nbytes])
                    f.write(buf.tobytes())
                    if progress is not None:
                        progress(self.stride)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):  # start cold: drop the freshly written pages from the page cache
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        tmp.replace(self.path)

    def _offset(self, layer: int, expert: int) -> int:
        return (layer * self.num_experts + expert) * self.stride

    def read_into(self, layer: int, expert: int, out: torch.Tensor, verify: bool = True) -> None:
        mv = memoryview(out[: self.nbytes].numpy()).cast("B")
        done = 0
        while done < self.nbytes:
            n = os.preadv(self.fd, [mv[done:]], self._offset(layer, expert) + done)
            if n <= 0:
                raise CheckpointError(f"layer {layer} expert {expert}: short read", self.path)
            done += n
        if verify and zlib.crc32(mv) != self.crc[(layer, expert)]:
            raise CheckpointError(f"layer {layer} expert {expert}: checksum mismatch", self.path)

    def decode(self, buf: torch.Tensor, layer: int, expert: int) -> ExpertWeights:
        from moe_local.formats.schemes import PackedWeight

        parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in self.proj_shapes}
        for proj, name, off, tshape, dtype, n in self.layout:
            parts[proj][name] = buf[off : off + n].view(dtype).view(tshape)
        w = {p: PackedWeight(scheme=self.scheme, packed=parts[p], shape=s) for p, s in self.proj_shapes.items()}
        return ExpertWeights(w["gate"], w["up"], w["down"])

    def load(self, layer: int, expert: int) -> ExpertWeights:
        return self.decode(self.view(layer, expert), layer, expert)

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------- routing
def synthetic_routing(shape: Shape, tokens: int, seed: int = 0, reuse: float = 0.35) -> list[list[list[int]]]:
    """tokens x layers x top_k ids: Zipf(1.1) popularity per layer + reuse of the previous token's picks."""
    rng = np.random.default_rng(seed)
    E, k = shape.experts, shape.top_k
    pops = []
    for _ in range(shape.layers):
        p = 1.0 / np.arange(1, E + 1) ** 1.1
        pops.append(rng.permutation(p / p.sum()))
    out, prev = [], None
    for _ in range(tokens):
        row = []
        for l in range(shape.layers):
            chosen: list[int] = []
            if prev is not None:
                chosen = [e for e in prev[l] if rng.random() < reuse][:k]
            while len(chosen) < k:
                e = int(rng.choice(E, p=pops[l]))
                if e not in chosen:
                    chosen.append(e)
            row.append(chosen)
        out.append(row)
        prev = row
    return out


def replay_routing(path: Path, shape: Shape, tokens: int) -> list[list[list[int]]]:
    from moe_local.cache.trace import read_trace

    tr = read_trace(path)
    rows = [t for t in tr.tokens if t.phase == "decode"] or tr.tokens
    if not rows:
        raise MoeLocalError("the trace has no tokens", path)
    n = len(tr.moe_layers)
    out = []
    for i in range(tokens):
        tok = rows[i % len(rows)]
        row = []
        for l in range(shape.layers):
            ids: list[int] = []
            for e in tok.experts[l % n]:
                m = e % shape.experts
                if m not in ids:
                    ids.append(m)
            j = 0
            while len(ids) < shape.top_k:  # fewer distinct ids after mapping: fill deterministically
                if j % shape.experts not in ids:
                    ids.append(j % shape.experts)
                j += 1
            row.append(ids[: shape.top_k])
        out.append(row)
    return out


def record_shared_trace(out: Path, tokens: int) -> Path:
    """Teacher-forced decode of the shared model over its held-out ids, recording the routing trace."""
    from moe_local.cache.options import CacheOptions, provider_factory
    from moe_local.runtime.loader import load_model

    model_dir = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "pycode-deepseek"
    if not (model_dir / "config.json").is_file():
        raise MoeLocalError("shared model not found (see shared/README.md)", model_dir)
    ids = np.load(model_dir / "eval_ids.npy")[: tokens + 1].astype(np.int64)
    opts = CacheOptions(ram="1GiB", prefetch_depth=2, trace=out)
    lm = load_model(model_dir, device="cpu", dtype="float32", provider=provider_factory(opts))
    lm.model.setup_cache(len(ids))
    for pos, tok in enumerate(ids):
        lm.model(torch.tensor([int(tok)]), pos, last_only=True)
    lm.provider.close()
    return out


# --------------------------------------------------------------------------- one configuration
def link_bandwidth(nbytes: int, device: torch.device) -> tuple[float, str]:
    """Steady-state bandwidth of the link experts cross (copies of at least 64 MiB: no per-call overhead)."""
    nbytes = max(int(nbytes), 64 * MiB)
    if device.type == "cuda":
        return measure_h2d_bandwidth(nbytes, device), "pinned H2D"
    src = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 5 * nbytes / (time.perf_counter() - t0), "RAM copy"


def run_config(store, shape: Shape, routing, *, device, dtype, label: str, gpu_slots: int, host_slots: int,
               policy: str, depth: int, extra: int, bandwidth: float, warmup: int) -> dict:
    """Decode `routing` through a fresh TieredExperts; timing excludes the first `warmup` tokens."""
    cuda = device.type == "cuda"
    provider = TieredExperts(store, top_k=shape.top_k, host_slots=host_slots, gpu_slots=gpu_slots,
                             device=device, dtype=dtype, policy=policy, miss="transfer",
                             predictor=OraclePredictor(routing, shape, depth, extra) if depth else None)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, shape.hidden, generator=g) * 0.1).to(device, dtype)
    w = torch.full((1, shape.top_k), 1.0 / shape.top_k, device=device)
    times = []
    before = None
    for t, row in enumerate(routing):
        if t == warmup:
            before = provider.report()
        if provider.predictor is not None:
            provider.predictor.t = t
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for layer, ids in enumerate(row):
            provider.forward(layer, x, torch.tensor([ids], device=device), w)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    after = provider.report()
    provider.close()
    timed = times[warmup:]
    n = len(timed)
    b0 = before or {"bytes": {"disk_to_ram": 0, "ram_to_gpu": 0}, "uses": 0, "hit_rate": 0.0, "stall_s": 0.0}
    moved = (after["bytes"]["disk_to_ram"] + after["bytes"]["ram_to_gpu"]
             - b0["bytes"]["disk_to_ram"] - b0["bytes"]["ram_to_gpu"])
    hits = after["hit_rate"] * after["uses"] - b0["hit_rate"] * b0["uses"]
    uses = after["uses"] - b0["uses"]
    per_tok = moved / n if n else 0.0
    link = after["bytes"]["ram_to_gpu"] - b0["bytes"]["ram_to_gpu"] if cuda else moved
    return {
        "shape": shape.name, "config": label, "policy": policy, "prefetch_depth": depth, "prefetch_extra": extra,
        "gpu_slots": gpu_slots, "host_slots": host_slots, "tokens": n,
        "tokens_per_s": n / sum(timed) if timed else 0.0,
        "p50_ms": 1000 * float(np.median(timed)) if timed else 0.0,
        "hit_rate": hits / uses if uses else 0.0,
        "bytes_per_token": per_tok,
        "link_bytes_per_token": link / n if n else 0.0,
        "link_bytes_per_s": bandwidth,
        "roofline_tokens_per_s": bandwidth / (link / n) if n and link else math.inf,
        "stall_s": after["stall_s"] - b0["stall_s"],
        "prefetch": after["prefetch"],
    }


class OraclePredictor:
    """Prefetch from the routing being replayed, `depth` layers ahead (+`extra` next-most-popular ids).

    The benchmark has no model hidden states, so it cannot run routers; this stands in for the
    router lookahead with *perfect* predictions -- the upper bound of what prefetch can buy. Real
    prediction accuracy is measured on the shared model (`router_recall` in a run report).
    """

    def __init__(self, routing, shape: Shape, depth: int, extra: int) -> None:
        self.routing, self.shape, self.depth, self.extra, self.t = routing, shape, depth, extra, 0

    def sources(self) -> list:
        return []  # no earlier prediction points: the replay starts at the first MoE layer

    def listen(self, callback):
        return lambda: None

    def predict(self, layer: int, x, site: str = "mlp"):
        out = []
        for d in range(1, self.depth + 1):
            target = layer + d
            if target < self.shape.layers:
                out.append((d, target, list(self.routing[self.t][target])))
        return out


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["mixtral", "qwen3", "both"], default="both")
    ap.add_argument("--layers", type=int, default=None, help="shrink the number of MoE layers")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--budgets", default="8GiB,16GiB", help="GPU budgets (expert slots only)")
    ap.add_argument("--ram", default=None, help="RAM tier size (default: half of available RAM)")
    ap.add_argument("--policies", default="lru,lfu-aging")
    ap.add_argument("--prefetch-depth", type=int, default=1)
    ap.add_argument("--replay", type=Path, default=None, help="routing trace to replay")
    ap.add_argument("--record-shared", type=Path, default=None, help="record the shared model's trace here first")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate the synthetic store (temp)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the harness")
    a = ap.parse_args(argv)

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
    from rich.table import Table

    console = Console(stderr=True)
    cuda = torch.cuda.is_available() and not a.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = SMOKE_SHAPES if a.cpu_smoke else SHAPES
    names = ["mixtral", "qwen3"] if a.shape == "both" else [a.shape]
    if a.record_shared is not None:
        a.replay = record_shared_trace(a.record_shared, a.tokens + a.warmup)
    rows, notes = [], []
    try:
        import accelerate  # noqa: F401
        notes.append("accelerate is installed but its device_map baseline is not implemented in this harness yet")
    except ImportError:
        notes.append("transformers+accelerate device_map baseline skipped: accelerate is not installed")
    if not cuda:
        notes.append("no CUDA: the compute tier is RAM; 'budgets' size the RAM tier; link = RAM copy bandwidth")
    for name in names:
        shape = shapes[name]
        if a.layers:
            shape = Shape(shape.name, shape.hidden, shape.inter, shape.experts, shape.top_k, a.layers)
        work = Path(tempfile.mkdtemp(prefix="moe-local-bench-", dir=a.workdir))
        try:
            total = shape.layers * shape.experts
            with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True) as prog:
                task = prog.add_task(f"writing {shape.name} INT4 experts", total=None)
                store = SyntheticInt4Store(work, shape, progress=lambda n: prog.update(task, advance=n))
            slot = round_slot(store.nbytes)
            routing = (replay_routing(a.replay, shape, a.tokens + a.warmup) if a.replay
                       else synthetic_routing(shape, a.tokens + a.warmup))
            bw, link_name = link_bandwidth(slot, device)
            ram = parse_size(a.ram, "--ram") or min(total * slot, int(_available() * 0.5))
            host_slots = max(shape.top_k * 2, min(total, ram // slot))
            if cuda:
                budgets = [(b, parse_size(b)) for b in a.budgets.split(",")]
            else:  # CPU: RAM-tier sizes of 25% and 50% of all experts
                budgets = [(f"{p}% of experts", int(total * p / 100) * slot) for p in (25, 50)]
            for label, budget in budgets:
                if cuda:
                    try:
                        plan = plan_budget(slot_bytes=store.nbytes, num_keys=total, top_k=shape.top_k,
                                           resident_bytes=0, kv_bytes=0, expanded_bytes=0, gpu_budget=budget,
                                           ram_budget=ram, cuda=True)
                    except MoeLocalError as exc:
                        notes.append(f"{shape.name} {label}: {exc}")
                        continue
                    gpu_slots, hs = plan.gpu_slots, host_slots
                else:
                    gpu_slots, hs = 0, max(shape.top_k, min(total, budget // slot))
                for policy in a.policies.split(","):
                    for depth in sorted({0, a.prefetch_depth}):
                        rows.append(run_config(store, shape, routing, device=device, dtype=dtype,
                                               label=str(label), gpu_slots=gpu_slots, host_slots=hs, policy=policy,
                                               depth=depth, extra=0, bandwidth=bw, warmup=a.warmup))
            rows.append(run_config(store, shape, routing, device=device, dtype=dtype, label="no-cache",
                                   gpu_slots=shape.top_k if cuda else 0,
                                   host_slots=shape.top_k if not cuda else host_slots, policy="lru", depth=0,
                                   extra=0, bandwidth=bw, warmup=a.warmup))
            rows[-1]["link"] = link_name
            store.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"moe-local offload benchmark ({'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}; "
                        f"routing: {'replay ' + str(a.replay) if a.replay else 'synthetic'})")
    for col in ("shape", "budget", "policy", "prefetch", "tokens/s", "hit rate", "moved/token", "link",
                "roofline tok/s", "stall s"):
        table.add_column(col, justify="right" if col not in ("shape", "budget", "policy") else "left")
    for r in rows:
        table.add_row(r["shape"], r["config"], r["policy"], str(r["prefetch_depth"]), f"{r['tokens_per_s']:.2f}",
                      f"{100 * r['hit_rate']:.1f}%", format_bytes(r["bytes_per_token"]),
                      f"{r['link_bytes_per_s'] / 1e9:.1f} GB/s",
                      "inf" if math.isinf(r["roofline_tokens_per_s"]) else f"{r['roofline_tokens_per_s']:.2f}",
                      f"{r['stall_s']:.3f}")
    out = Console(width=max(150, Console().width))
    out.print(table)
    for n in notes:
        out.print(f"[dim]note:[/] {n}")
    if a.json is not None:
        result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows, "notes": notes,
                  "routing": str(a.replay) if a.replay else "synthetic", "torch": torch.__version__}
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=lambda o: None if isinstance(o, float) and math.isinf(o) else str(o)))
        tmp.replace(a.json)
    return 0


def _available() -> int:
    import psutil

    return psutil.virtual_memory().available


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MoeLocalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
