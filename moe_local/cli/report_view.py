"""Render a run report (`generate --stats-json FILE`) as rich tables, and optionally as a PNG.

The report is one JSON object, format "moe-local-run-report" v1 (runtime/report.py reads and checks
it). Sections a run did not produce (no GPU tier without CUDA, no prefetch section at depth 0, an
empty latency list) are simply left out of the rendering rather than shown as zeros, so a table
never claims a measurement that was not made.

`--plot` needs matplotlib, which is *not* a dependency of moe-local (a 40 MB install for one
optional picture); without it the command says so in one line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from moe_local.errors import MoeLocalError
from moe_local.runtime.report import check_output_dir
from moe_local.units import format_bytes


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if _is_num(x) else "-"


def _num(x: Any, fmt: str = "{:,}") -> str:
    if not _is_num(x):
        return "-"
    return fmt.format(x)


def _bytes(n: Any) -> str:
    return format_bytes(n) if _is_num(n) else "-"


def _seconds(x: Any) -> str:
    if not _is_num(x):
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def render_report(report: dict) -> Group:
    """All tables of a report, in reading order: run, speed, cache tiers, prefetch + bytes, layers."""
    parts: list[Any] = []
    opts = report.get("options", {})
    toks = report.get("tokens", {})
    run = Table(title="run", show_header=False, title_justify="left")
    run.add_column(style="bold")
    run.add_column()
    run.add_row("model", str(report.get("model", "-")))
    run.add_row("device / dtype", f"{report.get('device', '-')} / {report.get('dtype', '-')}")
    resident = "cache" not in report  # `--experts resident`: no cache, so no policy, budgets or hit rates
    if resident:
        run.add_row("experts", "all resident (no expert cache)")
    else:
        run.add_row("policy", f"{opts.get('policy', '-')}  (prefetch depth {opts.get('prefetch_depth', '-')}, "
                              f"extra {opts.get('prefetch_extra', '-')}, miss {opts.get('miss', '-')})")
        run.add_row("budgets", f"gpu {_bytes(opts.get('gpu_mem')) if opts.get('gpu_mem') is not None else 'none'}, "
                               f"ram {_bytes(opts.get('ram')) if opts.get('ram') is not None else 'auto'}")
    cached = f" ({_num(toks['cached'])} cached)" if toks.get("cached") else ""  # a chat turn's reused prefix
    run.add_row("tokens", f"{_num(toks.get('prompt'))} prompt{cached}, {_num(toks.get('generated'))} generated")
    parts.append(run)

    tim = report.get("timings", {})
    lat = tim.get("token_latency_s", {}) if isinstance(tim.get("token_latency_s"), dict) else {}
    speed = Table(title="speed", title_justify="left")
    for col in ("first token", "prompt tok/s", "gen tok/s", "mean", "p50", "p90", "p99"):
        speed.add_column(col, justify="right")
    speed.add_row(
        _seconds(tim.get("ttft_s")), _num(tim.get("prompt_tps"), "{:,.1f}"), _num(tim.get("gen_tps"), "{:,.2f}"),
        *(_seconds(lat.get(k)) for k in ("mean", "p50", "p90", "p99")),
    )
    parts.append(speed)

    cache = report.get("cache", {})
    tiers = cache.get("tiers", {})
    tier_table = Table(title=f"expert cache: effective hit rate {_pct(cache.get('hit_rate'))}", title_justify="left")
    for col in ("tier", "capacity (slots)", "hits", "misses", "hit rate", "evictions"):
        tier_table.add_column(col, justify="left" if col == "tier" else "right")
    for name in ("gpu", "ram", *(k for k in tiers if k not in ("gpu", "ram"))):
        t = tiers.get(name)
        if not isinstance(t, dict):
            continue
        h, m = t.get("hits"), t.get("misses")
        rate = h / (h + m) if _is_num(h) and _is_num(m) and h + m else None
        tier_table.add_row(name, _num(t.get("capacity")), _num(h), _num(m), _pct(rate), _num(t.get("evictions")))
    extra = []
    if _is_num(cache.get("stall_s")):
        extra.append(f"stalled waiting for experts: {_seconds(cache['stall_s'])}")
    if _is_num(cache.get("cpu_computed")) and "gpu" in tiers:  # --miss cpu/auto: only a GPU run can fall back to the CPU
        extra.append(f"experts computed on the CPU: {cache['cpu_computed']:,}")
    if extra:
        tier_table.caption = "; ".join(extra)
    if not resident:
        parts.append(tier_table)

    pf = cache.get("prefetch")
    if isinstance(pf, dict) and pf:
        t = Table(title="prefetch", title_justify="left")
        for col in ("issued", "used", "late", "wasted", "precision", "recall"):
            t.add_column(col, justify="right")
        t.add_row(*(_num(pf.get(k)) for k in ("issued", "used", "late", "wasted")),
                  _pct(pf.get("precision")), _pct(pf.get("recall")))
        parts.append(t)

    moved = cache.get("bytes")
    if isinstance(moved, dict) and moved:
        t = Table(title="bytes moved", title_justify="left")
        has_gpu = "gpu" in tiers or bool(moved.get("ram_to_gpu"))  # a CPU-only run has no such link
        cols = [("disk -> ram", "disk_to_ram"), *([("ram -> gpu", "ram_to_gpu")] if has_gpu else []),
                ("per token", "per_token")]
        for col, _ in cols:
            t.add_column(col, justify="right")
        t.add_row(*(_bytes(moved.get(key)) for _, key in cols))
        parts.append(t)

    layers = cache.get("layers", [])
    if layers:
        t = Table(title="per layer", title_justify="left")
        for col in ("layer", "uses", "hits", "misses", "hit rate"):
            t.add_column(col, justify="right")
        for row in layers:
            t.add_row(_num(row.get("layer")), _num(row.get("uses")), _num(row.get("hits")), _num(row.get("misses")),
                      _pct(_layer_rate(row)))
        parts.append(t)
    return Group(*parts)


def _layer_rate(row: dict) -> float | None:
    if _is_num(row.get("hit_rate")):
        return float(row["hit_rate"])
    uses, hits = row.get("uses"), row.get("hits")
    return hits / uses if _is_num(uses) and _is_num(hits) and uses else None


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoeLocalError(
            "--plot needs matplotlib, which moe-local does not install: pip install matplotlib"
        ) from None
    return plt


def check_plot_target(out: str | Path) -> None:
    """Fail before rendering anything if the plot cannot be written (no matplotlib, no directory)."""
    _pyplot()
    check_output_dir(out)


def plot_report(report: dict, out: str | Path) -> Path:
    """Two panels: hit rate per layer (bars) and the per-token latency histogram; PNG via a temp name."""
    plt = _pyplot()
    out = Path(out)
    check_plot_target(out)
    layers = report.get("cache", {}).get("layers", [])
    lat = report.get("timings", {}).get("token_latencies_s", [])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        xs = [str(row.get("layer", i)) for i, row in enumerate(layers)]
        ys = [100 * (_layer_rate(row) or 0.0) for row in layers]
        ax1.bar(xs, ys, color="tab:blue")
        ax1.set_ylim(0, 100)
        ax1.set_xlabel("layer")
        ax1.set_ylabel("hit rate (%)")
        overall = report.get("cache", {}).get("hit_rate")
        suffix = f" (overall {100 * overall:.1f}%)" if _is_num(overall) else ""
        ax1.set_title("expert cache hit rate per layer" + suffix)
        if not layers:
            note = "all experts resident: no cache" if "cache" not in report else "no per-layer data"
            ax1.text(0.5, 0.5, note, ha="center", va="center", transform=ax1.transAxes)
        ms = [1000 * x for x in lat]
        if ms:
            ax2.hist(ms, bins=max(5, min(50, int(math.sqrt(len(ms))) * 2)), color="tab:orange")
        else:
            ax2.text(0.5, 0.5, "no token latencies", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_xlabel("time per output token (ms)")
        ax2.set_ylabel("tokens")
        ax2.set_title("token latency")
        fig.suptitle(f"{report.get('model', '')} on {report.get('device', '')}")
        fig.tight_layout()
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
    return out
