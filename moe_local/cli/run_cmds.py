"""`generate`, `chat` and `inspect`: parse options, call the runtime, render its events. No logic here.

The options `generate` and `chat` share are declared once in options.py; each command lists them in
its signature and builds the runtime's option objects from them (which check themselves).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.markup import escape
from rich.table import Table

from moe_local.cli.common import err, out, user_errors
from moe_local.cli.options import (BeladyTrace, Device, DType, Experts, GpuMem, IgnoreEos, MaxTokens, MinP, Miss,
                                   ModelArg, Policy, PrefetchDepth, PrefetchExtra, Ram, RepeatLastN, RepeatPenalty,
                                   Seed, StatsJson, Stop, Temperature, TopK, TopP, TraceFile, Threads, load_options,
                                   sampling_options)
from moe_local.errors import MoeLocalError
from moe_local.runtime.generate import GenerateOptions, GenerationResult, GenerationStream
from moe_local.runtime.loader import LoadOptions
from moe_local.runtime.report import check_output_dir, write_json_atomic
from moe_local.runtime.session import check_prompt_options
from moe_local.units import format_bytes, format_count


def open_session(model: str, load: LoadOptions, need_tokenizer: bool = False):
    """Load with a status line, then say what was loaded where (stderr)."""
    from moe_local.runtime.session import Session

    t0 = time.perf_counter()
    with err.status(f"loading {escape(model)} ..."):
        session = Session.open(model, load.device, load.dtype, provider=load.provider(), need_tokenizer=need_tokenizer,
                               threads=load.threads)
    lm = session.lm
    err.print(f"[dim]loaded {lm.model.family} from {escape(str(lm.root))} on {lm.device} ({str(lm.dtype).removeprefix('torch.')}) "
              f"with {lm.threads} thread{'s' if lm.threads != 1 else ''} in {time.perf_counter() - t0:.1f} s[/]")
    for note in lm.model.notes():
        err.print(f"[yellow]note: {escape(note)}[/]")
    if load.cache.gpu_mem is not None and lm.device.type != "cuda":
        err.print("[yellow]note: --gpu-mem is ignored on the CPU; --ram sizes the expert cache[/]")
    return session


# ------------------------------------------------------------------ rendering
def cache_rows(c: dict | None) -> list[tuple[str, str]]:
    """The expert cache's live figures (Session.cache_stats) as the rows shown after a reply and by /stats."""
    if c is None:
        return []
    pf = c["prefetch"]
    tiers = ", ".join(f"{name} {s['used']}/{s['capacity']}" for name, s in c["slots"].items())
    rows = [("expert hit rate", f"{100 * c['hit_rate']:.1f}% of {c['uses']} uses"),
            ("cache slots", f"{tiers} ({format_bytes(c['slot_bytes'])} each, policy {c['policy']})"),
            ("moved / token", format_bytes(c["bytes"]["per_token"])),
            ("stalled on experts", f"{c['stall_s']:.3f} s")]
    if pf["issued"]:
        rows.append(("prefetch", f"{pf['issued']} issued, {pf['used']} used, {pf['late']} late, "
                                 f"{pf['wasted']} wasted (precision {100 * pf['precision']:.0f}%)"))
    if c["cpu_computed"]:
        rows.append(("computed on CPU", str(c["cpu_computed"])))
    return rows


def print_timing(result: GenerationResult) -> None:
    err.print(f"[dim]{result.timings.summary_line()}[/]")


def stream_to_stdout(stream: GenerationStream, ids_only: bool) -> GenerationResult:
    """Print text deltas as they come (token ids when there is no tokenizer); Ctrl-C ends the reply early.

    Ends the line unless the text already did, so the timing line on stderr starts on a fresh line
    without a blank one before it."""
    at_line_start = True
    try:
        for event in stream:
            if ids_only:
                typer.echo(f"{event.token} ", nl=False)
                at_line_start = False
            elif event.text:
                typer.echo(event.text, nl=False)
                at_line_start = event.text.endswith("\n")
    except KeyboardInterrupt:
        stream.close()
        if not at_line_start:
            typer.echo("")
        at_line_start = True
        err.print("[yellow]\\[interrupted][/]")
    if not at_line_start:
        typer.echo("")
    assert stream.result is not None
    return stream.result


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise MoeLocalError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


NO_TEMPLATE_NOTE = "note: this model has no chat template; turns are joined as plain 'role: content' text"


# ------------------------------------------------------------------ commands
@user_errors
def generate(
    model: ModelArg,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text ('-' reads stdin).")] = None,
    prompt_ids: Annotated[Optional[str], typer.Option(help="Prompt as token ids: 1,2,3 (no tokenizer needed).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[Optional[str], typer.Option(help="System message (implies --chat).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")] = False,
    max_tokens: MaxTokens = 256, temperature: Temperature = 0.8, top_k: TopK = 40, top_p: TopP = 0.95,
    min_p: MinP = 0.05, repeat_penalty: RepeatPenalty = 1.0, repeat_last_n: RepeatLastN = 64, seed: Seed = None,
    ignore_eos: IgnoreEos = False, stop: Stop = None,
    threads: Threads = None, device: Device = None, dtype: DType = None, experts: Experts = "tiered", gpu_mem: GpuMem = None,
    ram: Ram = None, policy: Policy = "arc", prefetch_depth: PrefetchDepth = 1, prefetch_extra: PrefetchExtra = 2,
    miss: Miss = "auto", trace: TraceFile = None, belady_trace: BeladyTrace = None, stats_json: StatsJson = None,
) -> None:
    """Continue a prompt, streaming the text to stdout; timings go to stderr."""
    gen = sampling_options(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed,
                           ignore_eos, stop)
    load = load_options(device, dtype, experts, gpu_mem, ram, policy, prefetch_depth, prefetch_extra, miss, trace,
                        belady_trace, threads)
    if stats_json is not None:
        check_output_dir(stats_json)  # not after the whole generation
    check_prompt_options(prompt, prompt_ids, chat, system)
    ids = parse_ids(prompt_ids) if prompt_ids is not None else None
    if prompt == "-":
        prompt = sys.stdin.read()
    session = open_session(model, load, need_tokenizer=ids is None)
    use_chat = chat or system is not None
    if use_chat and session.chat_template is None:
        err.print(f"[yellow]{NO_TEMPLATE_NOTE}[/]")
    try:
        stream = session.stream(session.prompt_ids(prompt, ids, chat=use_chat, system=system), gen)
        if as_json:
            result = stream.collect()
            payload = result.to_dict()
            if (cache := session.cache_report()) is not None:
                payload["cache"] = cache  # hit rates depend on transfer timing; tokens never do
            typer.echo(json.dumps(payload))
        else:
            result = stream_to_stdout(stream, ids_only=session.tokenizer is None)
            print_timing(result)
            for name, value in cache_rows(session.cache_stats()):
                err.print(f"[dim]{escape(name)}: {escape(value)}[/]")
    finally:
        session.close()
    write_stats(stats_json, load, session, result)


def write_stats(path: Path | None, load: LoadOptions, session, result: GenerationResult | None) -> None:
    """--stats-json: the run report of the last reply (written atomically after the provider settled)."""
    if path is None or result is None:
        return
    write_json_atomic(path, session.run_report(result, load.report_options()))
    err.print(f"[dim]run report written to {escape(str(path))}[/]")


CHAT_HELP = """commands:
  /help    this help
  /reset   forget the conversation (keeps the system message)
  /stats   timings of the last reply and the expert cache's live figures
  /quit    leave (also /exit, Ctrl-D, or Ctrl-C at the prompt)
multi-line input: end a line with \\ to continue on the next one,
  or type \"\"\" on a line of its own to start a block and again to end it.
Ctrl-C while the model is answering stops the answer, not the chat;
  on a "..." line it drops the message being typed."""


def read_message(ask: Callable[[str], str]) -> str | None:
    """One user message (possibly multi-line); None at end of input.

    Ctrl-C at the first prompt propagates (the chat ends); Ctrl-C on a continuation line ("... ")
    drops the message being typed and returns "" (nothing to send), as Python's REPL does, so a
    botched paste does not end the whole chat."""
    try:
        line = ask(">>> ")
    except EOFError:
        return None
    try:
        if line.strip() == '"""':
            lines: list[str] = []
            while True:
                try:
                    more = ask("... ")
                except EOFError:
                    break
                if more.strip() == '"""':
                    break
                lines.append(more)
            return "\n".join(lines)
        parts = []
        while line.endswith("\\"):
            parts.append(line[:-1])
            try:
                line = ask("... ")
            except EOFError:
                line = ""
                break
        parts.append(line)
        return "\n".join(parts)
    except KeyboardInterrupt:
        typer.echo("")
        return ""


def stats_table(session, result: GenerationResult | None) -> Table | str:
    if result is None:
        return "no reply yet"
    t = result.timings
    table = Table(show_header=False, box=None)
    cached = f" ({t.cached_tokens} cached)" if t.cached_tokens else ""  # earlier turns, not prefilled again
    rows = [("prompt tokens", f"{t.prompt_tokens}{cached}"), ("prompt tok/s", f"{t.prompt_tps:.1f}"),
            ("generated tokens", str(t.generated_tokens)), ("generated tok/s", f"{t.gen_tps:.1f}"),
            ("time to first token", f"{t.ttft_s * 1000:.0f} ms"), ("stop reason", result.stop_reason),
            ("context used", f"{len(result.prompt_ids) + len(result.tokens)} / {session.generator.context_length}")]
    for name, value in rows + cache_rows(session.cache_stats()):
        table.add_row(name, value)
    return table


def _input(prompt: str) -> str:
    """input() with line editing on a terminal; a plain read otherwise (pipes, tests)."""
    if sys.stdin.isatty():
        import readline  # noqa: F401  (gives input() history and editing)

        return input(prompt)
    typer.echo(prompt, nl=False)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


@user_errors
def chat(
    model: ModelArg,
    system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
    max_tokens: MaxTokens = 256, temperature: Temperature = 0.8, top_k: TopK = 40, top_p: TopP = 0.95,
    min_p: MinP = 0.05, repeat_penalty: RepeatPenalty = 1.0, repeat_last_n: RepeatLastN = 64, seed: Seed = None,
    ignore_eos: IgnoreEos = False, stop: Stop = None,
    threads: Threads = None, device: Device = None, dtype: DType = None, experts: Experts = "tiered", gpu_mem: GpuMem = None,
    ram: Ram = None, policy: Policy = "arc", prefetch_depth: PrefetchDepth = 1, prefetch_extra: PrefetchExtra = 2,
    miss: Miss = "auto", trace: TraceFile = None, belady_trace: BeladyTrace = None, stats_json: StatsJson = None,
) -> None:
    """Talk to a model. Type /help inside for commands and multi-line input."""
    from moe_local.runtime.session import ChatSession

    gen = sampling_options(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed,
                           ignore_eos, stop)
    load = load_options(device, dtype, experts, gpu_mem, ram, policy, prefetch_depth, prefetch_extra, miss, trace,
                        belady_trace, threads)
    if stats_json is not None:
        check_output_dir(stats_json)  # not after the whole conversation
    session = open_session(model, load, need_tokenizer=True)
    convo = ChatSession(session, system=system)
    try:
        repl(session, convo, gen)
    finally:
        session.close()
    write_stats(stats_json, load, session, convo.last)


def repl(session, convo, gen: GenerateOptions) -> None:
    """Read messages and commands until /quit or end of input; stream each reply."""
    if not convo.templated:
        err.print(f"[yellow]{NO_TEMPLATE_NOTE}[/]")
    err.print("[dim]type /help for commands[/]")
    while True:
        try:
            text = read_message(_input)
        except KeyboardInterrupt:
            text = None
        if text is None:
            typer.echo("")
            return
        command = text.strip()
        if command in ("/quit", "/exit"):
            return
        if command == "/help":
            typer.echo(CHAT_HELP)
            continue
        if command == "/reset":
            convo.reset()
            typer.echo("(conversation cleared)")
            continue
        if command == "/stats":
            out.print(stats_table(session, convo.last))
            continue
        if command.startswith("/"):
            typer.echo(f"unknown command {command.split()[0]}; /help lists them")
            continue
        if not command:
            continue
        try:
            result = stream_to_stdout(convo.reply(text, gen), ids_only=False)
        except MoeLocalError as exc:  # e.g. the conversation outgrew the context: say so, keep the chat
            err.print(f"[bold red]error:[/] {escape(str(exc))} (/reset starts a new conversation)")
            continue
        print_timing(result)


@user_errors
def inspect_cmd(
    model: ModelArg,
    dtype: Annotated[Optional[str], typer.Option(help="dtype the memory figures assume: float32 | bfloat16 | float16 "
                                                "(default: what a run here uses, bf16 on GPU, fp32 on CPU)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Family, experts, parameters and the memory a run needs, from config and headers (no weights read).

    On a pack: also the scheme of every tensor group and the bytes of one expert per MoE layer."""
    from moe_local.runtime.inspect import CONFIG_ONLY, pack_rows, summarize

    s = summarize(model, dtype)
    if as_json:
        typer.echo(json.dumps(s.to_dict()))
        return
    table = Table(title=escape(s.path), show_header=False, title_justify="left")
    rows = [
        ("family", s.family),
        ("layers", f"{s.layers} ({s.moe_layers} MoE, {s.layers - s.moe_layers} dense)"),
        ("experts per layer", str(s.experts_per_layer)),
        ("top-k", str(s.top_k)),
        ("shared experts", str(s.shared_experts)),
        ("hidden / expert size", f"{s.hidden_size} / {s.expert_intermediate_size}"),
        ("context", f"{s.context_length} tokens"),
        ("total params", format_count(s.total_params)),
        ("active params / token", format_count(s.active_params)),
        ("dense (non-expert) params", format_count(s.dense_params)),
        ("checkpoint", f"{format_bytes(s.checkpoint_bytes)} ({s.checkpoint_dtype})"),
        ("bytes per expert", f"{format_bytes(s.bytes_per_expert)} ({s.checkpoint_dtype})"),
        (f"KV cache per token ({s.run_dtype})", format_bytes(s.kv_bytes_per_token)),
        *([("recurrent state (fixed)", f"{format_bytes(s.state_bytes)} (linear-attention layers, any context)")]
          if s.state_bytes else []),
        (f"memory, all resident ({s.run_dtype})", format_bytes(s.memory_all_resident)),
        (f"min --ram, offload ({s.run_dtype})",
         f"{format_bytes(s.memory_min_offload, round_up=True)} (CPU expert offload: resident weights + KV cache "
         f"for {s.kv_tokens} tokens + one layer's top-{s.top_k} experts, the budget check's minimum)"),
        (f"min --gpu-mem ({s.run_dtype})",
         f"{format_bytes(s.memory_min_gpu, round_up=True)} (the same + the GPU workspace: activations, "
         f"cuBLAS, fragmentation)"),
    ]
    if s.checkpoint_dtype == CONFIG_ONLY:  # a folder with only config.json: nothing stored to describe
        at = [name for name, _ in rows].index("checkpoint")
        rows[at:at + 2] = [("checkpoint", f"none ({CONFIG_ONLY})"),
                           ("bytes per expert", f"{format_bytes(s.bytes_per_expert)} (in {s.run_dtype})")]
    if s.pack is not None:  # packed experts: the memory figures keep them packed
        at = [name for name, _ in rows].index("bytes per expert")
        rows[at] = ("largest expert", f"{format_bytes(s.bytes_per_expert)} (packed)")
        rows += pack_rows(s.pack)
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("chat")(chat)
    app.command("inspect")(inspect_cmd)
