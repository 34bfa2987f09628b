"""`report` and `simulate`: look at what the expert cache did, and what it could do. No logic here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moe_local.cli.common import err, out, user_errors
from moe_local.errors import MoeLocalError

DEFAULT_POLICIES = "lru,lfu-aging,arc,belady"
DEFAULT_SIZES = "12.5%,25%,50%"


@user_errors
def report_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Run report written by `generate --stats-json FILE`.")],
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw hit rate per layer and the latency "
                                                 "histogram to this PNG (needs matplotlib).")] = None,
) -> None:
    """Render a run report as tables: speed, cache tiers, prefetch, bytes moved, hit rate per layer."""
    from moe_local.cache.report import check_plot_target, load_report, plot_report, print_report

    rep = load_report(file)
    if plot is not None:
        check_plot_target(plot)
    print_report(rep, out)
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
    from moe_local.cache.simulate import (
        budget_slots, check_prefetch_depth, min_slots, parse_policies, parse_sizes, recommend, select_steps,
        simulate, step_prediction_depths,
    )
    from moe_local.cache.budget import parse_size
    from moe_local.cache.trace import read_trace

    trace = read_trace(trace_file)
    names = parse_policies(policy)
    need = min_slots(trace, per_layer)
    if sizes is None:  # defaults below the minimum are raised to it rather than refused
        slot_list = sorted({max(s, need) for s in parse_sizes(DEFAULT_SIZES, trace)})
    else:
        slot_list = parse_sizes(sizes, trace)
        if slot_list[0] < need:
            unit = f"{trace.top_k} per layer x {len(trace.moe_layers)} layers" if per_layer else "one layer's top_k"
            raise MoeLocalError(f"--sizes {slot_list[0]} is too small: a layer needs {trace.top_k} slots at once, "
                                f"so the minimum is {need} ({unit})")
    budget_bytes = parse_size(budget, "--budget", allow_auto=False)
    if budget_bytes is not None:
        budget_slots(trace, budget_bytes, per_layer=per_layer)  # fail before replaying anything
    steps = select_steps(trace, include_prefill)
    check_prefetch_depth(trace, prefetch_depth, steps)  # fail before replaying anything
    n_layers = len(trace.moe_layers)
    depths = [0] + ([prefetch_depth] if prefetch_depth > 0 else [])
    runs = [(name, slots, d) for slots in slot_list for name in names for d in depths
            if not (d > 0 and name == "belady")]

    results = []
    rec = None
    with _progress() as bar:
        task = bar.add_task("replaying", total=len(runs))
        for name, slots, d in runs:
            results.append(simulate(trace, name, slots, per_layer=per_layer, prefetch_depth=d, steps=steps))
            bar.advance(task)
        if budget_bytes is not None:
            held = step_prediction_depths(steps)  # only depths with predictions for every level 1..d
            rec_depths = [d for d in range(0, max(held, default=0) + 1) if all(x in held for x in range(1, d + 1))]
            online = [n for n in names if n != "belady"] or ["lru", "lfu-aging", "arc"]
            n_rec = len(online) * len(rec_depths) + 1
            task2 = bar.add_task("recommending", total=n_rec)
            rec, _ = recommend(trace, budget_bytes, online, rec_depths, per_layer=per_layer,
                               include_prefill=include_prefill, progress=lambda: bar.advance(task2))

    uses = results[0].uses if results else 0
    if as_json:
        out.print_json(json.dumps({
            "trace": str(trace_file), "model": trace.model, "steps": len(steps), "uses": uses,
            "mode": "per-layer" if per_layer else "global", "moe_layers": trace.moe_layers,
            "num_experts": trace.num_experts, "top_k": trace.top_k, "expert_bytes": trace.expert_bytes,
            "results": [r.to_dict() for r in results],
            "recommendation": rec.to_dict() if rec else None,
        }))
        return

    mode = "one cache per layer" if per_layer else "one global cache"
    table = Table(title=f"hit rate, {trace.model}: {len(steps):,} steps, {uses:,} expert uses, {mode}",
                  title_justify="left")
    table.add_column("policy")
    table.add_column("prefetch", justify="right")
    for slots in slot_list:
        share = 100 * slots / (trace.num_experts * n_layers)
        table.add_column(f"{slots} slots\n{slots / n_layers:g}/layer, {share:.1f}%", justify="right")
    for name in names:
        for d in depths:
            if d > 0 and name == "belady":
                continue
            cells = []
            for slots in slot_list:
                r = next(x for x in results if x.policy == name and x.prefetch_depth == d
                         and _requested(x, slots, per_layer, n_layers))
                cells.append(f"{100 * r.hit_rate:.1f}%")
            style = "bold" if name == "belady" else None
            table.add_row(name + (" (optimum)" if name == "belady" else ""), str(d) if d else "-", *cells, style=style)
    out.print(table)

    pf_rows = [r for r in results if r.prefetch is not None]
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
        out.print(
            f"budget {budget}: {rec.slots} expert slots of {trace.expert_bytes:,} bytes{fit}. "
            f"Recommended: --policy {rec.policy} --prefetch-depth {rec.prefetch_depth}, "
            f"expected hit rate {100 * rec.hit_rate:.1f}% (Belady optimum without prefetch "
            f"{100 * rec.belady_hit_rate:.1f}%)."
        )


def _requested(result, slots: int, per_layer: bool, n_layers: int) -> bool:
    """Per-layer runs round the total down to a multiple of the layer count; match on the request."""
    return result.slots == (slots // n_layers) * n_layers if per_layer else result.slots == slots


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
    app.command("simulate")(simulate_cmd)
