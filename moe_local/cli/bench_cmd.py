"""`moe-local bench`: parse llama-bench's flags, run runtime/bench.py's measurement, render the table or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moe_local.cli.common import err, out, user_errors
from moe_local.cli.options import (BeladyTrace, Device, DType, Experts, GpuMem, Miss, ModelArg, Policy, PrefetchDepth,
                                   PrefetchExtra, Ram, Threads, TraceFile, load_options)
from moe_local.cli.run_cmds import open_session
from moe_local.runtime.bench import BenchOptions, BenchResult, Repetition, model_facts, run_bench
from moe_local.runtime.threads import parse_threads
from moe_local.runtime.report import check_output_dir, write_json_atomic
from moe_local.units import format_bytes, format_count

BENCH = "Benchmark"


def result_table(r: BenchResult) -> Table:
    """llama-bench's table (model, size, params, backend, threads, test, t/s) plus bytes read per
    decode token and the share of the measured bandwidth that decode rate uses."""
    table = Table()
    for name, right in (("model", False), ("size", True), ("params", True), ("backend", False),
                        ("threads", True), ("test", False), ("t/s", True), ("bytes/token", True),
                        ("% of bw", True)):
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    common = (f"{escape(r.model)} {escape(r.weights)}", format_bytes(r.size_bytes), format_count(r.params),
              r.backend, str(r.threads))
    table.add_row(*common, f"pp{r.prompt_tokens}", f"{r.pp.mean:.2f} ± {r.pp.stddev:.2f}", "", "")
    table.add_row(*common, f"tg{r.gen_tokens}", f"{r.tg.mean:.2f} ± {r.tg.stddev:.2f}",
                  format_bytes(r.bytes_per_token), f"{r.roofline_pct:.1f}%")
    return table


def note_line(r: BenchResult) -> str:
    """What the last two columns mean, with the figures behind them."""
    bw = f"{r.bandwidth_gbps:.1f} GB/s " + ("measured" if r.bandwidth_measured else "given")
    return (f"bytes/token: weights one decode token reads (dense {format_bytes(r.dense_bytes_per_token)} + routed "
            f"experts {format_bytes(r.expert_bytes_per_token)}); % of bw: tg x bytes/token / read bandwidth {bw}")


def progress_line(i: int, total: int, rep: Repetition) -> None:
    what = "warm-up" if i == 0 else f"repetition {i}/{total}"
    err.print(f"[dim]{what}: pp {rep.pp_tps:.2f} tok/s, tg {rep.tg_tps:.2f} tok/s[/]")


@user_errors
def bench(
    model: ModelArg,
    n_prompt: Annotated[int, typer.Option("--n-prompt", "-p", rich_help_panel=BENCH,
                                          help="Prompt tokens per repetition (random ids): the pp test.")] = 512,
    n_gen: Annotated[int, typer.Option("--n-gen", "-n", rich_help_panel=BENCH,
                                       help="Tokens decoded after the prompt: the tg test.")] = 128,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", rich_help_panel=BENCH,
                                             help="Timed repetitions (after one warm-up that is not counted).")] = 5,
    seed: Annotated[int, typer.Option(rich_help_panel=BENCH, help="Seed of the random token ids.")] = 0,
    bandwidth: Annotated[Optional[float], typer.Option("--bandwidth", metavar="GBps", rich_help_panel=BENCH,
                                                       help="Memory read bandwidth in GB/s (default: measured).")] = None,
    as_json: Annotated[bool, typer.Option("--json", rich_help_panel=BENCH,
                                          help="Print one JSON object (every repetition too).")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", rich_help_panel=BENCH,
                                                   help="Also write the JSON object to FILE.")] = None,
    threads: Threads = None,
    device: Device = None, dtype: DType = None, experts: Experts = "tiered", gpu_mem: GpuMem = None,
    ram: Ram = None, policy: Policy = "arc", prefetch_depth: PrefetchDepth = 1, prefetch_extra: PrefetchExtra = 2,
    miss: Miss = "auto", trace: TraceFile = None, belady_trace: BeladyTrace = None,
) -> None:
    """Prompt-processing and decode speed, llama-bench style: tok/s, bytes read per token, % of bandwidth."""
    options = BenchOptions(n_prompt, n_gen, repetitions, parse_threads(threads), seed, bandwidth)
    options.validate()
    load = load_options(device, dtype, experts, gpu_mem, ram, policy, prefetch_depth, prefetch_extra, miss, trace,
                        belady_trace, options.threads)
    if output is not None:
        check_output_dir(output)
    session = open_session(model, load)
    try:
        facts = model_facts(session.lm.root)
        result = run_bench(session.lm, options, name=session.lm.root.name, facts=facts, experts=experts,
                           on_repetition=None if as_json else progress_line)
        payload = result.to_dict()
        if (cache := session.cache_report()) is not None:
            payload["cache"] = cache
    finally:
        session.close()
    if output is not None:
        write_json_atomic(output, payload)
    if as_json:
        typer.echo(json.dumps(payload))
    else:
        # piped, at its natural width (rich would squeeze it into 80 columns and cut the figures)
        console = out if out.is_terminal else Console(file=sys.stdout, width=200, highlight=False)
        console.print(result_table(result))
        console.print(note_line(result))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
