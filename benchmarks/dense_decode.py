"""Dense weights at the bytes they need: resident bytes and batch-1 decode speed per way of holding them.

The routed experts are the same in every row (an int4 pack of MODEL, experts resident as packed
views of the pack's memory map); only the non-expert ("dense") weights change:

    fp32   the pack's bf16 dense matrices upcast to float32 at load (what moe-local did before)
    bf16   held as stored, bf16, computed by formats.compute.linear with float32 activations
    int8   a `--dense int8` pack: packed int8 (per output channel), computed from the codes
    int4   a `--dense int4` pack: packed int4 (g32), computed from the codes

Columns: resident bytes of the dense weights as held (cache.budget.module_bytes), the dense bytes
one token reads (every matrix but the embedding table, of which one row is read), decode tok/s as
the median over rounds with min..max, the fastest and the median single decode step (on a shared
machine the fastest step is the one that had the cores), and whether the greedy tokens equal the
fp32 row's.
Rounds alternate the order of the rows (A B C D, D C B A, ...) so that load on a shared machine
spreads over all of them. `--threads 1,2` adds a row per thread count (runtime.threads.apply_threads:
torch's pool and the C kernel pool where there is one). OpenMP waits passively, as in the CLI; run
with OMP_WAIT_POLICY=active to see the spinning default.

    python benchmarks/dense_decode.py                                  # /tmp/bench/q3moe, packs in /tmp/bench/dense
    python benchmarks/dense_decode.py MODEL --work DIR --tokens 16 --rounds 3 --rows fp32,bf16 --threads 1,2
    python benchmarks/dense_decode.py --json dense.json

Packs are made once into --work (reused when present). Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does (moe_local/cli/__init__.py), before torch loads

import torch  # noqa: E402

from moe_local.cache.budget import module_bytes
from moe_local.convert.quantize import quantize
from moe_local.convert.recipes import build_recipe
from moe_local.formats.pack import is_pack
from moe_local.formats.schemes import PackedWeight
from moe_local.runtime.loader import load_model
from moe_local.units import format_bytes

ROWS = ("fp32", "bf16", "int8", "int4")
PACK_OF = {"fp32": "bf16", "bf16": "bf16", "int8": "int8", "int4": "int4"}  # row -> --dense of its pack
PROMPT = [1, 345, 2078, 99, 4711, 12, 808, 5]


def ensure_pack(model: Path, work: Path, dense: str, experts: str) -> Path:
    out = work / f"{experts}-dense-{dense}"
    if not is_pack(out):
        print(f"quantizing {model} -> {out} (--scheme {experts} --dense {dense}) ...", file=sys.stderr)
        quantize(model, out, build_recipe(experts, dense=dense), force=out.exists())
    return out


def upcast_dense(model: torch.nn.Module) -> None:
    """The old loading rule: every float matrix converted to float32 once, at load."""
    for m in model.modules():
        w = m._parameters.get("weight")
        if w is not None and w.dim() == 2 and w.dtype != torch.float32:
            m.weight = torch.nn.Parameter(w.float(), requires_grad=False)


def dense_read_bytes(model: torch.nn.Module) -> int:
    """Bytes of dense weights one decode step reads: all but the embedding table (one row of it)."""
    emb = model.model.embed_tokens.weight
    emb_bytes = emb.nbytes if isinstance(emb, PackedWeight) else emb.numel() * emb.element_size()
    tied = model.lm_head.weight is emb
    return module_bytes(model) - (0 if tied else emb_bytes)


def decode(lm, tokens: int) -> tuple[float, list[float], list[int]]:
    """Greedy decode of `tokens` tokens after the fixed prompt; returns (tok/s, seconds per step, tokens)."""
    model = lm.model
    ids = torch.tensor(PROMPT)
    model.setup_cache(len(PROMPT) + tokens + 1)
    logits = model(ids, 0, last_only=True)
    out, steps, pos = [], [], len(PROMPT)
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = int(logits[-1].argmax())
        out.append(tok)
        t = time.perf_counter()
        logits = model(torch.tensor([tok]), pos)
        steps.append(time.perf_counter() - t)
        pos += 1
    return tokens / (time.perf_counter() - t0), steps, out


def run_row(pack: Path, row: str, threads: int, tokens: int) -> dict:
    t0 = time.perf_counter()
    lm = load_model(pack, device="cpu", dtype="float32", threads=threads)
    if row == "fp32":
        upcast_dense(lm.model)
    load_s = time.perf_counter() - t0
    tps, steps, out = decode(lm, tokens)
    res = {"resident_bytes": module_bytes(lm.model), "read_bytes": dense_read_bytes(lm.model), "tps": tps,
           "steps_s": steps, "tokens": out, "load_s": load_s}
    del lm
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="/tmp/bench/q3moe", type=Path)
    ap.add_argument("--work", default=Path("/tmp/bench/dense"), type=Path, help="where the packs are made")
    ap.add_argument("--experts", default="int4", help="scheme of the routed experts (every row)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--threads", default="1", help="torch intra-op threads, comma-separated (a row each)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    rows = [r.strip() for r in args.rows.split(",")]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown {bad}; choose from {', '.join(ROWS)}")
    threads = [int(t) for t in args.threads.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    packs = {r: ensure_pack(args.model, args.work, PACK_OF[r], args.experts) for r in rows}
    cells = [(r, t) for r in rows for t in threads]
    results: dict[tuple[str, int], list[dict]] = {c: [] for c in cells}
    for i in range(args.rounds):
        for r, t in (cells if i % 2 == 0 else list(reversed(cells))):
            res = run_row(packs[r], r, t, args.tokens)
            results[(r, t)].append(res)
            print(f"round {i + 1} {r:5s} t={t}: {res['tps']:.2f} tok/s", file=sys.stderr)

    ref = results.get(("fp32", threads[0]), [None])[0]
    table = []
    for (r, t), runs in results.items():
        tps = [x["tps"] for x in runs]
        steps = sorted(s for x in runs for s in x["steps_s"])
        table.append({"row": r, "threads": t, "resident_bytes": runs[0]["resident_bytes"],
                      "read_bytes_per_token": runs[0]["read_bytes"], "tps_median": statistics.median(tps),
                      "tps_min": min(tps), "tps_max": max(tps), "tps_all": tps,
                      "step_ms_best": 1e3 * steps[0], "step_ms_p50": 1e3 * statistics.median(steps),
                      "same_tokens_as_fp32": None if ref is None else runs[0]["tokens"] == ref["tokens"]})
    print(f"\n{args.model} (experts {args.experts}), {args.tokens} decode tokens x {args.rounds} rounds\n")
    print("| dense | threads | resident dense | dense read/token | decode tok/s (median, min..max) "
          "| step ms (best, p50) | tokens = fp32 |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in table:
        print(f"| {row['row']} | {row['threads']} | {format_bytes(row['resident_bytes'])} | "
              f"{format_bytes(row['read_bytes_per_token'])} | {row['tps_median']:.2f} ({row['tps_min']:.2f}..{row['tps_max']:.2f}) | "
              f"{row['step_ms_best']:.0f}, {row['step_ms_p50']:.0f} | {row['same_tokens_as_fp32']} |")
    if args.json is not None:
        payload = {"model": str(args.model), "experts": args.experts, "tokens": args.tokens, "rounds": args.rounds,
                   "torch_version": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                   "rows": table}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
