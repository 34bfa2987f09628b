"""`moe-local serve`: parse options, load the model once, run the server, render its log lines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from moe_local.cli.common import err, user_errors
from moe_local.cli.options import (BeladyTrace, Device, DType, Experts, GpuMem, Miss, ModelArg, Policy, PrefetchDepth,
                                   PrefetchExtra, Ram, StatsJson, TraceFile, Threads, load_options)
from moe_local.cli.run_cmds import open_session, write_stats
from moe_local.runtime.report import check_output_dir
from moe_local.errors import MoeLocalError

_SERVER_PANEL = "Server"
INSTALL_HINT = "pip install 'moe-local[serve]'"


def _require_server_deps() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MoeLocalError(f"`moe-local serve` needs starlette and uvicorn ({exc.name} is not installed): "
                            f"{INSTALL_HINT}") from None


def default_alias(model: str) -> str:
    """A folder serves under its own name (as ollama and llama-server show it); a hub id under the id."""
    path = Path(model)
    return path.resolve().name if path.exists() else model


def log_line(record) -> str:
    """One line per request: method, path, status, tokens, TTFT, tok/s, duration."""
    parts = [time.strftime("%H:%M:%S"), record.method, record.path, str(record.status)]
    if record.prompt_tokens is not None:
        cached = f" ({record.cached_tokens} cached)" if record.cached_tokens else ""
        parts.append(f"prompt {record.prompt_tokens} tokens{cached}, completion {record.completion_tokens} tokens")
        if record.ttft_s is not None:
            parts.append(f"TTFT {record.ttft_s * 1000:.0f} ms, {record.gen_tps or 0.0:.1f} tok/s")
        if record.queue_wait_s >= 0.05:  # below that it is thread hand-over, not a queue
            parts.append(f"waited {record.queue_wait_s:.2f} s")
    parts.append(f"{record.seconds:.3f} s")
    if record.finish is not None:
        parts.append(record.finish)
    return " ".join(parts[:4]) + (" " + ", ".join(parts[4:]) if parts[4:] else "")


@user_errors
def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(rich_help_panel=_SERVER_PANEL, help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, rich_help_panel=_SERVER_PANEL, help="TCP port (0: any free port).")] = 8080,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="MOE_LOCAL_API_KEY", rich_help_panel=_SERVER_PANEL, help="Require 'Authorization: Bearer KEY' on every request but /health.")] = None,
    max_queue: Annotated[int, typer.Option(min=0, rich_help_panel=_SERVER_PANEL, help="Requests that may wait behind the running one; more get 503.")] = 64,
    alias: Annotated[Optional[str], typer.Option(rich_help_panel=_SERVER_PANEL, help="Model name clients use (default: the folder or repo name).")] = None,
    ctx_size: Annotated[Optional[int], typer.Option("--ctx-size", "-c", min=2, rich_help_panel=_SERVER_PANEL, help="KV cache positions, prompt + reply (default: the model's context, at most 4096).")] = None,
    threads: Threads = None, device: Device = None, dtype: DType = None, experts: Experts = "tiered", gpu_mem: GpuMem = None,
    ram: Ram = None, policy: Policy = "arc", prefetch_depth: PrefetchDepth = 1, prefetch_extra: PrefetchExtra = 2,
    miss: Miss = "auto", trace: TraceFile = None, belady_trace: BeladyTrace = None, stats_json: StatsJson = None,
) -> None:
    """Serve the model over the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models), with /health and /metrics."""
    _require_server_deps()
    from moe_local.serve.server import ServeOptions, bind, build, serve as run_server

    load = load_options(device, dtype, experts, gpu_mem, ram, policy, prefetch_depth, prefetch_extra, miss, trace,
                        belady_trace, threads)
    if ctx_size is not None:
        load.cache.context = ctx_size  # the GPU budget reserves KV for the context the server will use
    if stats_json is not None:
        check_output_dir(stats_json)
    if api_key is not None and not api_key.strip():
        raise MoeLocalError("--api-key must not be empty")
    sock = bind(host, port)  # before loading: a port in use is reported at once
    try:
        session = open_session(model, load, need_tokenizer=True)
        try:
            name = alias or default_alias(model)
            options = ServeOptions(host, port, name, api_key, max_queue, ctx_size)
            engine, _, app = build(session, options,
                                   on_request=lambda r: err.print(escape(log_line(r)), highlight=False))
            bound_host, bound_port = sock.getsockname()[:2]
            url_host = f"[{bound_host}]" if ":" in bound_host else bound_host

            def ready() -> None:
                err.print(f"serving [bold]{escape(name)}[/] at http://{escape(url_host)}:{bound_port}/v1 "
                          f"(OpenAI API; context {engine.ctx_size} tokens, queue {max_queue}"
                          f"{', API key required' if api_key else ''}); Ctrl-C stops")
                if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
                    err.print("[yellow]note: listening beyond this machine without --api-key: anyone who can "
                              "reach the port can use the model[/]")

            run_server(app, engine, sock, on_ready=ready)
        finally:
            session.close()
        err.print("[dim]server stopped[/]")
    finally:
        sock.close()
    write_stats(stats_json, load, session, engine.last_result)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
