"""`quantize` and `eval`: parse options, call moe_local.convert.quantize / moe_local.runtime.evaluate, render
(the size plan table, the progress bars of a quantize run, the eval table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)
from rich.table import Table

from moe_local.cli.common import err, out, user_errors
from moe_local.cli.options import Threads
from moe_local.units import format_bytes, layer_ranges


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_cmd)
    app.command("eval")(eval_cmd)


@user_errors
def quantize_cmd(
    src: Annotated[str, typer.Argument(metavar="SRC", help="Hugging Face checkpoint folder, hub id, or DeepSeek-V3 FP8 checkpoint.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to create the pack in.")],
    scheme: Annotated[str, typer.Option("--scheme", "-s",
                                        help="bf16|int8|int4|nf4|mxfp4|ternary|ternary-absmean or a recipe (ds-dynamic-1.58, ds-dynamic-2.2); mxfp4 keeps an MXFP4 checkpoint's codes as they are.")] = "int4",
    group_size: Annotated[Optional[int], typer.Option("--group-size", "-g", help="Group size for grouped schemes.")] = None,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", help="PROJ=SCHEME, e.g. down_proj=int8 (repeatable).")] = None,
    layers: Annotated[Optional[list[str]], typer.Option("--layers", help="A-B=SCHEME, e.g. 0-2=int8 (repeatable).")] = None,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Token ids .npy for importance weighting.")] = None,
    calibration_tokens: Annotated[int, typer.Option("--calibration-tokens", help="Tokens of --calibration to use.")] = 4096,
    dense: Annotated[Optional[str], typer.Option("--dense", help="Non-expert matrices: bf16 (default), int8 or int4 (g32; int4:N picks the group), kept packed at run time.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the size plan and stop.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it is an existing pack.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision of SRC.")] = None,
) -> None:
    """Quantize a checkpoint's routed experts into a memory-mapped pack (streamed, verified, atomic)."""
    from moe_local.convert.quantize import quantize
    from moe_local.convert.recipes import build_recipe
    from moe_local.runtime.inspect import pack_size_text

    recipe = build_recipe(scheme, group_size, keep, layers, dense)
    if dry_run:
        print_plan(quantize(src, out_dir, recipe, dry_run=True, revision=revision), src)
        return
    bars = ProgressBars(err)
    try:
        result = quantize(src, out_dir, recipe, calibration_path=calibration, calibration_tokens=calibration_tokens,
                          force=force, progress=bars, revision=revision,
                          note=lambda text: err.print(f"[yellow]note: {escape(text)}[/]"))
    finally:
        bars.stop()
    err.print(
        f"wrote {result.out}: {pack_size_text(result.weight_bytes, result.other_bytes)}; "
        f"routed experts at {result.expert_bits_per_weight:.3f} bits/weight\n"
        f"read {format_bytes(result.source_bytes)} of source tensors in {result.seconds:.2f} s "
        f"({result.gbps:.3f} GB/s); total {result.total_seconds:.2f} s incl. verification; "
        f"peak RSS {format_bytes(result.peak_rss)} (at start {format_bytes(result.rss_before)}; "
        f"peak private memory while streaming {format_bytes(result.peak_anon)}, the rest is the source's page cache)"
    )


class ProgressBars:
    """A quantize run's phases (convert.quantize.QuantizeProgress) as rich progress bars on `console`."""

    def __init__(self, console: Console) -> None:
        self.bars = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[done]}/{task.fields[of]} {task.fields[unit]}"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, int] = {}

    def begin(self, phase: str, total: int | None, count: int | str, unit: str) -> None:
        if not self.tasks:
            self.bars.start()
        self.tasks[phase] = self.bars.add_task(phase, total=total, done=0, of=count, unit=unit)

    def advance(self, phase: str, nbytes: int, done: int = 0) -> None:
        task = self.tasks[phase]
        self.bars.update(task, advance=nbytes, done=self.bars.tasks[task].fields["done"] + done)

    def stop(self) -> None:
        if self.tasks:
            self.bars.stop()


def print_plan(plan, ref: str) -> None:
    """The dry run: per tensor group layers, projection, scheme, bits/weight and bytes per expert, then sizes."""
    from moe_local.convert.quantize import plan_rows, plan_summary
    from moe_local.runtime.inspect import pack_size_text

    table = Table(title=f"size plan: {plan.src} -> recipe {plan.recipe.name}", show_lines=False)
    for col in ("layers", "projection", "scheme", "shape", "bits/weight", "bytes/expert"):
        table.add_column(col, justify="right" if col in ("bits/weight", "bytes/expert") else "left")
    for r in plan_rows(plan):
        if r.projection is None:  # a whole expert's byte range
            table.add_row(layer_ranges(r.layers, sep=","), "[bold]expert range", "", "", f"{r.bits_per_weight:.3f}",
                          f"[bold]{r.nbytes:,}")
        else:
            table.add_row(layer_ranges(r.layers, sep=","), r.projection, r.scheme, "x".join(map(str, r.shape)),
                          f"{r.bits_per_weight:.3f}", f"{r.nbytes:,}")
    out.print(table)
    s = plan_summary(plan, ref)
    out.print(
        f"routed experts: {s['experts']} in {s['expert_files']} file(s), {format_bytes(s['expert_bytes'])} "
        f"at {s['expert_bits_per_weight']:.3f} bits/weight (scales included)\n"
        f"non-expert weights ({s['dense_scheme']}): {format_bytes(s['dense_bytes'])}\n"
        f"pack total: {pack_size_text(s['weight_bytes'], s['other_bytes'], approx=True)}\n"
        f"(source tensors: {format_bytes(s['source_bytes'])}; weight files are "
        f"{s['weight_bytes'] / max(s['source_bytes'], 1):.1%} of them)"
    )


@user_errors
def eval_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Checkpoint folder, hub id or pack folder.")],
    tokens: Annotated[Path, typer.Option("--tokens", help="Token ids (.npy, uint16/int32, 1-D).")],
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Use the first N ids.")] = None,
    window: Annotated[int, typer.Option("--window", help="Tokens per window.")] = 512,
    reference: Annotated[Optional[str], typer.Option("--reference", help="Model to compare against (KL, top-1).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 or auto.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    threads: Threads = None,
) -> None:
    """Perplexity on a token file; with --reference, KL(reference || model) and top-1 agreement."""
    from moe_local.runtime.evaluate import check_eval_options, evaluate, load_token_ids, windows
    from moe_local.runtime.loader import load_model, resolve_device, resolve_dtype
    from moe_local.runtime.threads import resolve_threads

    check_eval_options(window, max_tokens)
    resolve_dtype(dtype)
    resolve_device(device)
    n_threads = resolve_threads(threads)  # refused before any weight is read
    lm = load_model(model, device=device, dtype=dtype, threads=n_threads)
    ref = load_model(reference, device=device, dtype=dtype, threads=n_threads) if reference else None
    ids = load_token_ids(tokens, max_tokens, lm.config.get("vocab_size"))
    total = sum(e - s - 1 for s, e in windows(ids.numel(), window))
    with Progress(TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("eval", total=total)
        result = evaluate(lm, ids, window, ref, progress=lambda n: progress.update(task, advance=n))
    if as_json:
        out.print(json.dumps(result.to_json()), markup=False)
        return
    table = Table(title=f"{model} on {tokens.name}")
    for col in ("tokens", "ppl", "nll"):
        table.add_column(col, justify="right")
    row = [f"{result.tokens}", f"{result.ppl:.4f}", f"{result.nll:.5f}"]
    if ref is not None:
        table.add_column("KL(ref||model)", justify="right")
        table.add_column("top-1", justify="right")
        row += [f"{result.kl:.5f}", f"{result.top1:.2%}"]
    table.add_row(*row)
    out.print(table)
