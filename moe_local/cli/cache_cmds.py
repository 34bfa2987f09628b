"""`report` and `simulate`: look at what the expert cache did, and what it could do. Parse, call
cache.simulate (which checks and runs the grid), render."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moe_local.cache.simulate import DEFAULT_POLICIES, DEFAULT_SIZES
from moe_local.cli.common import err, out, user_errors


@user_errors
def report_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Run report written by `generate --stats-json FILE`.")],
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw hit rate per layer and the latency "
                                                 "histogram to this PNG (needs matplotlib).")] = None,
) -> None:
    """Render a run report as tables: speed, cache tiers, prefetch, bytes moved, hit rate per layer."""
    from moe_local.cli.report_view import check_plot_target, plot_report, render_report
    from moe_local.runtime.report import load_report

    rep = load_report(file)
    if plot is not None:
        check_plot_target(plot)
    out.print(render_report(rep))
    if plot is not None:
        written = plot_report(rep, plot)
        err.print(f"wrote {written}")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True, disable=not err.is_terminal)


@user_errors
def simulate_cmd(
    trace_file: Annotated[Path, typer.Argument(metavar="TRACE", help="Routing trace written by `generate --trace`.")],
    policy: Annotated[str, typer.Option("--policy", help="Comma-separated policies.")] = DEFAULT_POLICIES,
    sizes: Annotated[Optional[str], typer.Option("--sizes", help="Cache sizes: slots in total (96), a share of all "
                                                 "experts (25%), or per layer (16/layer); comma-separated. "
                                                 f"Default {DEFAULT_SIZES}.")] = None,
    prefetch_depth: Annotated[int, typer.Option("--prefetch-depth", min=0,
                                                help="Also replay router-lookahead prefetch 1..D layers ahead.")] = 0,
    budget: Annotated[Optional[str], typer.Option("--budget", help="Recommend a policy + prefetch depth for this "
                                                  "many bytes of expert cache (e.g. 6GiB; GB = 10^9 bytes), trying every policy "
                                                  "and every prefetch depth the trace has predictions for.")] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="One cache per MoE layer (size split evenly) "
                                            "instead of one global budget.")] = False,
    include_prefill: Annotated[bool, typer.Option("--include-prefill", help="Replay prefill calls too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of tables.")] = False,
) -> None:
    """Replay a routing trace through cache policies and sizes; compare with the Belady optimum."""
    from moe_local.cache.simulate import (budget_spend, grid_runs, plan_grid, recommend, recommendation_candidates,
                                          run_grid)
    from moe_local.units import format_bytes
    from moe_local.cache.trace import read_trace

    trace = read_trace(trace_file)
    grid = plan_grid(trace, policy, sizes, prefetch_depth, budget, per_layer, include_prefill)  # checks it all first
    rec = None
    with _progress() as bar:
        task = bar.add_task("replaying", total=len(grid_runs(grid)))
        run_grid(grid, progress=lambda: bar.advance(task))
        if grid.budget_bytes is not None:
            online, rec_depths = recommendation_candidates(grid)
            task2 = bar.add_task("recommending", total=len(online) * len(rec_depths) + 1)
            rec, _ = recommend(trace, grid.budget_bytes, online, rec_depths, per_layer=per_layer,
                               include_prefill=include_prefill, progress=lambda: bar.advance(task2))
    n_layers, uses = len(trace.moe_layers), grid.uses
    if as_json:
        out.print_json(json.dumps({
            "trace": str(trace_file), "model": trace.model, "steps": len(grid.steps), "uses": uses,
            "mode": "per-layer" if per_layer else "global", "moe_layers": trace.moe_layers,
            "num_experts": trace.num_experts, "top_k": trace.top_k, "expert_bytes": trace.expert_bytes,
            "results": [r.to_dict() for r in grid.results],
            "recommendation": rec.to_dict() if rec else None,
        }))
        return

    mode = "one cache per layer" if per_layer else "one global cache"
    table = Table(title=f"hit rate, {trace.model}: {len(grid.steps):,} steps, {uses:,} expert uses, {mode}",
                  title_justify="left")
    table.add_column("policy")
    table.add_column("prefetch", justify="right")
    for slots in grid.slots:
        share = 100 * slots / (trace.num_experts * n_layers)
        table.add_column(f"{slots} slots\n{slots / n_layers:g}/layer, {share:.1f}%", justify="right")
    for name in grid.policies:
        for d in grid.depths:
            if d > 0 and name == "belady":
                continue
            cells = [f"{100 * grid.result(name, slots, d).hit_rate:.1f}%" for slots in grid.slots]
            style = "bold" if name == "belady" else None
            table.add_row(name + (" (optimum)" if name == "belady" else ""), str(d) if d else "-", *cells, style=style)
    out.print(table)

    pf_rows = [r for r in grid.results if r.prefetch is not None]
    if pf_rows:
        t = Table(title=f"prefetch, depth {prefetch_depth}", title_justify="left")
        for col in ("policy", "slots", "issued", "used", "wasted", "precision", "recall"):
            t.add_column(col, justify="left" if col == "policy" else "right")
        for r in pf_rows:
            p = r.prefetch
            t.add_row(r.policy, str(r.slots), f"{p.issued:,}", f"{p.used:,}", f"{p.wasted:,}",
                      f"{100 * p.precision:.1f}%", f"{100 * p.recall:.1f}%")
        out.print(t)

    if rec is not None:
        fit = " (every expert fits: only first uses miss)" if rec.all_fit else ""
        slot, fixed = budget_spend(trace)
        spent = (f"{format_bytes(fixed)} for resident weights and KV cache (as the recorded run's "
                 f"--{'gpu-mem' if trace.extra['budget'].get('device') == 'gpu' else 'ram'} counted them) + ") if fixed else ""
        out.print(
            f"budget {budget}: {spent}{rec.slots} expert slots of {slot:,} bytes{fit}. "
            f"Recommended: --policy {rec.policy} --prefetch-depth {rec.prefetch_depth}, "
            f"expected hit rate {100 * rec.hit_rate:.1f}% (Belady optimum without prefetch "
            f"{100 * rec.belady_hit_rate:.1f}%)."
        )


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
    app.command("simulate")(simulate_cmd)
