"""`generate`, `chat` and `inspect`: parse options, call the runtime, render its events. No logic here.

Options come in groups (`OptionGroup`): a list of Typer parameters plus a function that builds one
object from them, handed to the command under the group's name. A command declares the groups it
takes with `@with_groups(...)`. To add options (say the expert cache's --gpu-mem/--ram/--policy),
append parameters to `LOAD` and read them in `make_provider`; every command that loads a model
gets them.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.markup import escape
from rich.table import Table

from moe_local.cache.options import CacheOptions, provider_factory
from moe_local.cache.report import check_output_dir
from moe_local.cache.stats import write_json_atomic
from moe_local.cli.common import err, out, user_errors
from moe_local.errors import MoeLocalError
from moe_local.runtime.generate import GenerateOptions, GenerationResult, GenerationStream
from moe_local.runtime.loader import ProviderFactory, resident_provider
from moe_local.runtime.sampling import SamplingOptions


# ------------------------------------------------------------------ option groups
@dataclass
class OptionGroup:
    """Typer parameters that together build one object, passed to the command as keyword `name`."""

    name: str
    params: list[inspect.Parameter]
    build: Callable[..., Any]


def option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def with_groups(*groups: OptionGroup) -> Callable:
    """Replace each group's keyword in the command's signature by the group's options (Typer reads __signature__)."""

    def decorate(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn, include_extras=True)
        names = {g.name for g in groups}
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.name not in names]
        extra = [p for g in groups for p in g.params]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            for g in groups:
                kwargs[g.name] = g.build(**{p.name: kwargs.pop(p.name) for p in g.params})
            return fn(**kwargs)

        wrapper.__signature__ = inspect.Signature(own + extra)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
        del wrapper.__wrapped__  # make inspect use __signature__, not the original
        return wrapper

    return decorate


@dataclass
class LoadSpec:
    """How to load a model: device, dtype and the expert provider, plus every raw option for later groups."""

    device: str | None
    dtype: str | None
    provider: ProviderFactory
    options: dict[str, Any] = field(default_factory=dict)
    on_step: Optional[Callable[[Any], None]] = None  # e.g. a routing-trace recorder cutting steps (StepInfo)

    def open(self, model: str, need_tokenizer: bool = False):
        from moe_local.runtime.session import Session

        t0 = time.perf_counter()
        with err.status(f"loading {escape(model)} ..."):
            session = Session.open(model, self.device, self.dtype, provider=self.provider,
                                   on_step=self.on_step, need_tokenizer=need_tokenizer)
        lm = session.lm
        err.print(f"[dim]loaded {lm.model.family} from {escape(str(lm.root))} on {lm.device} ({str(lm.dtype).removeprefix('torch.')}) "
                  f"in {time.perf_counter() - t0:.1f} s[/]")
        for note in lm.model.notes():
            err.print(f"[yellow]note: {escape(note)}[/]")
        if self.options.get("gpu_mem") is not None and lm.device.type != "cuda":
            err.print("[yellow]note: --gpu-mem is ignored on the CPU; --ram sizes the expert cache[/]")
        return session


def cache_options(options: dict[str, Any]) -> CacheOptions:
    return CacheOptions(gpu_mem=options["gpu_mem"], ram=options["ram"], policy=options["policy"],
                        prefetch_depth=options["prefetch_depth"], prefetch_extra=options["prefetch_extra"],
                        miss=options["miss"], trace=options["trace"], belady_trace=options["belady_trace"])


def make_provider(options: dict[str, Any]) -> ProviderFactory:
    """The one place CLI options choose where experts live: the tiered cache, or all resident."""
    if options["experts"] == "resident":
        return resident_provider
    return provider_factory(cache_options(options))


def build_load(**kw: Any) -> LoadSpec:
    from moe_local.runtime.loader import DTYPES, resolve_device

    dtype, device = kw.get("dtype"), kw.get("device")
    if dtype is not None and dtype not in DTYPES:
        raise MoeLocalError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device is not None and device.split(":")[0] not in ("cpu", "cuda", "auto"):
        raise MoeLocalError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    resolve_device(device)  # a bad cuda:N, or cuda without CUDA: fail before anything is read
    if kw["stats_json"] is not None:
        check_output_dir(kw["stats_json"])  # not after the whole generation
    if kw["experts"] not in ("tiered", "resident"):
        raise MoeLocalError(f"--experts must be tiered or resident, got {kw['experts']!r}")
    return LoadSpec(kw.get("device"), kw.get("dtype"), make_provider(kw), kw)


_LOAD_PANEL, _CACHE_PANEL = "Model loading", "Expert cache"
LOAD = OptionGroup("load", [
    option("device", Annotated[Optional[str], typer.Option(rich_help_panel=_LOAD_PANEL, help="cpu | cuda | cuda:N (default: cuda if available)")], None),
    option("dtype", Annotated[Optional[str], typer.Option(rich_help_panel=_LOAD_PANEL, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")], None),
    option("experts", Annotated[str, typer.Option(rich_help_panel=_CACHE_PANEL, help="tiered: page routed experts through the RAM/GPU cache; resident: load them all up front.")], "tiered"),
    option("gpu_mem", Annotated[Optional[str], typer.Option("--gpu-mem", rich_help_panel=_CACHE_PANEL, help="GPU budget, e.g. 6GiB (default: free GPU memory minus headroom).")], None),
    option("ram", Annotated[Optional[str], typer.Option(rich_help_panel=_CACHE_PANEL, help="Host RAM budget for expert slots, e.g. 16GiB (default: half the available RAM).")], None),
    option("policy", Annotated[str, typer.Option(rich_help_panel=_CACHE_PANEL, help="Eviction: lru | lfu-aging | arc | belady (belady needs --belady-trace).")], "arc"),
    option("prefetch_depth", Annotated[int, typer.Option(rich_help_panel=_CACHE_PANEL, help="Prefetch experts predicted by the next D layers' routers (0 = off).")], 1),
    option("prefetch_extra", Annotated[int, typer.Option(rich_help_panel=_CACHE_PANEL, help="Spare experts prefetched beyond each predicted top-k.")], 2),
    option("miss", Annotated[str, typer.Option(rich_help_panel=_CACHE_PANEL, help="On a GPU miss: transfer | cpu (compute it from RAM) | auto.")], "auto"),
    option("trace", Annotated[Optional[Path], typer.Option(rich_help_panel=_CACHE_PANEL, help="Write the routing trace (layer and experts per token) to FILE, for `moe-local simulate`.")], None),
    option("belady_trace", Annotated[Optional[Path], typer.Option(rich_help_panel=_CACHE_PANEL, help="A trace of this same run, recorded earlier: the future --policy belady evicts by.")], None),
    option("stats_json", Annotated[Optional[Path], typer.Option(rich_help_panel=_CACHE_PANEL, help="Write the run report (timings, cache hits per tier and layer, prefetch, bytes moved) to FILE.")], None),
], build_load)


def build_sampling(temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                   repeat_last_n: int, seed: Optional[int], max_tokens: int, ignore_eos: bool,
                   stop: Optional[list[str]]) -> GenerateOptions:
    sampling = SamplingOptions(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
    sampling.validate()  # fail before the model is loaded
    if max_tokens < 0:
        raise MoeLocalError(f"--max-tokens must be >= 0, got {max_tokens}")
    return GenerateOptions(sampling, max_tokens=max_tokens, stop=list(stop or []), ignore_eos=ignore_eos)


SAMPLING = OptionGroup("gen", [
    option("max_tokens", Annotated[int, typer.Option("--max-tokens", "-n", rich_help_panel="Sampling", help="Most tokens to generate.")], 256),
    option("temperature", Annotated[float, typer.Option(rich_help_panel="Sampling", help="0 = greedy.")], 0.8),
    option("top_k", Annotated[int, typer.Option(rich_help_panel="Sampling", help="Keep the k most likely tokens (0 = off).")], 40),
    option("top_p", Annotated[float, typer.Option(rich_help_panel="Sampling", help="Nucleus: smallest set with this much probability (1 = off).")], 0.95),
    option("min_p", Annotated[float, typer.Option(rich_help_panel="Sampling", help="Drop tokens below min-p x the top probability (0 = off).")], 0.05),
    option("repeat_penalty", Annotated[float, typer.Option(rich_help_panel="Sampling", help="llama.cpp repetition penalty (1 = off).")], 1.0),
    option("repeat_last_n", Annotated[int, typer.Option(rich_help_panel="Sampling", help="Recent tokens the penalty looks at (-1 = all).")], 64),
    option("seed", Annotated[Optional[int], typer.Option(rich_help_panel="Sampling", help="Random seed (same seed, same tokens).")], None),
    option("ignore_eos", Annotated[bool, typer.Option("--ignore-eos", rich_help_panel="Sampling", help="Do not stop at end-of-sequence tokens.")], False),
    option("stop", Annotated[Optional[list[str]], typer.Option("--stop", rich_help_panel="Sampling", help="Stop before this text (repeatable).")], None),
], build_sampling)


# ------------------------------------------------------------------ rendering
def provider_stats(session) -> list[tuple[str, str]]:
    """Rows a provider wants shown after a reply (the expert cache implements `stats_rows()`)."""
    rows = getattr(session.lm.provider, "stats_rows", None)
    return list(rows()) if callable(rows) else []


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
ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="A model folder, or a Hugging Face repo id (org/name).")]


@user_errors
@with_groups(SAMPLING, LOAD)
def generate(
    model: ModelArg,
    gen: GenerateOptions,
    load: LoadSpec,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text ('-' reads stdin).")] = None,
    prompt_ids: Annotated[Optional[str], typer.Option(help="Prompt as token ids: 1,2,3 (no tokenizer needed).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[Optional[str], typer.Option(help="System message (implies --chat).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")] = False,
) -> None:
    """Continue a prompt, streaming the text to stdout; timings go to stderr."""
    if prompt is None and prompt_ids is None:
        raise MoeLocalError("give a prompt: --prompt TEXT or --prompt-ids 1,2,3")
    if prompt_ids is not None and (prompt is not None or chat or system is not None):
        raise MoeLocalError("--prompt-ids is the whole prompt: do not combine it with --prompt, --chat or --system")
    ids = parse_ids(prompt_ids) if prompt_ids is not None else None
    if prompt == "-":
        prompt = sys.stdin.read()
    session = load.open(model, need_tokenizer=ids is None)
    use_chat = chat or system is not None
    if use_chat and session.chat_template is None:
        err.print(f"[yellow]{NO_TEMPLATE_NOTE}[/]")
    try:
        stream = session.stream(session.prompt_ids(prompt, ids, chat=use_chat, system=system), gen)
        if as_json:
            result = stream.collect()
            payload = result.to_dict()
            if callable(report := getattr(session.lm.provider, "report", None)):
                payload["cache"] = report()  # hit rates depend on transfer timing; tokens never do
            typer.echo(json.dumps(payload))
        else:
            result = stream_to_stdout(stream, ids_only=session.tokenizer is None)
            print_timing(result)
            for name, value in provider_stats(session):
                err.print(f"[dim]{escape(name)}: {escape(value)}[/]")
    finally:
        session.close()
    write_stats(load, session, result)


def write_stats(load: LoadSpec, session, result: GenerationResult | None) -> None:
    """--stats-json: the run report of the last reply (written atomically after the provider settled)."""
    path = load.options.get("stats_json")
    if path is None or result is None:
        return
    options = cache_options(load.options).report_dict() if load.options["experts"] == "tiered" else {}
    write_json_atomic(path, session.run_report(result, options))
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
    for name, value in rows + provider_stats(session):
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
@with_groups(SAMPLING, LOAD)
def chat(
    model: ModelArg,
    gen: GenerateOptions,
    load: LoadSpec,
    system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
) -> None:
    """Talk to a model. Type /help inside for commands and multi-line input."""
    from moe_local.runtime.session import ChatSession

    session = load.open(model, need_tokenizer=True)
    convo = ChatSession(session, system=system)
    try:
        repl(session, convo, gen)
    finally:
        session.close()
    write_stats(load, session, convo.last)


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
    dtype: Annotated[str, typer.Option(help="dtype the memory figures assume: float32 | bfloat16 | float16")] = "bfloat16",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Family, experts, parameters and the memory a run needs, from config and headers (no weights read).

    On a pack: also the scheme of every tensor group and the bytes of one expert per MoE layer."""
    from moe_local.runtime.inspect import CONFIG_ONLY, RUN_DTYPE_BYTES, human_bytes, human_count, pack_rows, summarize

    if dtype not in RUN_DTYPE_BYTES:
        raise MoeLocalError(f"--dtype must be one of {', '.join(RUN_DTYPE_BYTES)}, got {dtype!r}")
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
        ("total params", human_count(s.total_params)),
        ("active params / token", human_count(s.active_params)),
        ("dense (non-expert) params", human_count(s.dense_params)),
        ("checkpoint", f"{human_bytes(s.checkpoint_bytes)} ({s.checkpoint_dtype})"),
        ("bytes per expert", f"{human_bytes(s.bytes_per_expert)} ({s.checkpoint_dtype})"),
        (f"KV cache per token ({s.run_dtype})", human_bytes(s.kv_bytes_per_token)),
        *([("recurrent state (fixed)", f"{human_bytes(s.state_bytes)} (linear-attention layers, any context)")]
          if s.state_bytes else []),
        (f"memory, all resident ({s.run_dtype})", human_bytes(s.memory_all_resident)),
        (f"min --ram, offload ({s.run_dtype})",
         f"{human_bytes(s.memory_min_offload)} (CPU expert offload: resident weights + one layer's "
         f"top-{s.top_k} experts, the budget check's minimum; KV cache not included)"),
    ]
    if s.checkpoint_dtype == CONFIG_ONLY:  # a folder with only config.json: nothing stored to describe
        at = [name for name, _ in rows].index("checkpoint")
        rows[at:at + 2] = [("checkpoint", f"none ({CONFIG_ONLY})"),
                           ("bytes per expert", f"{human_bytes(s.bytes_per_expert)} (in {s.run_dtype})")]
    if s.pack is not None:  # packed experts: the memory figures keep them packed
        at = [name for name, _ in rows].index("bytes per expert")
        rows[at] = ("largest expert", f"{human_bytes(s.bytes_per_expert)} (packed)")
        rows += pack_rows(s.pack)
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("chat")(chat)
    app.command("inspect")(inspect_cmd)
