"""Wire a loaded Session into an Engine, Metrics and the app, and run it under uvicorn until a signal.

The socket is bound before the model loads (`bind`), so a port already in use is reported at once
rather than after minutes of loading; it only starts listening once the model is ready.

Shutdown (SIGINT / SIGTERM): uvicorn stops accepting connections and waits for the open ones; our
`handle_exit` also tells the engine to stop, so a reply being generated ends after its current token
with a final chunk and no client is left hanging on a long generation. A second Ctrl-C quits at
once. The process then exits 0: uvicorn's default of re-raising the signal after a graceful stop
would turn every clean shutdown into a "killed by signal" exit status.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from dataclasses import dataclass
from typing import Callable

from moe_local.errors import MoeLocalError
from moe_local.serve.engine import Engine, Job
from moe_local.serve.metrics import Metrics
from moe_local.serve.protocol import finish_reason

# Seconds the shutdown waits for open responses (a reply stops after its current token; a long
# prefill cannot be interrupted) before the remaining tasks are cancelled.
GRACEFUL_SHUTDOWN_S = 30


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    model_name: str = "model"
    api_key: str | None = None
    max_queue: int = 64
    ctx_size: int | None = None  # None: the model's context, at most DEFAULT_CTX


DEFAULT_CTX = 4096  # positions allocated when --ctx-size is not given (a long-context model's full KV cache may not fit)


def bind(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket; a clear error for a bad host or a port in use."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MoeLocalError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise MoeLocalError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


def observe_job(metrics: Metrics) -> Callable[[Job], None]:
    """The engine's on_result hook: a finished (or cancelled, or failed) job into the metrics."""

    def observe(job: Job) -> None:
        r = job.result
        if r is None:
            metrics.observe_generation("error", queue_wait_s=job.queue_wait_s)
        else:
            t = r.timings
            outcome = ("cancelled" if job.cancelled else "error" if job.error else finish_reason(r.stop_reason))
            metrics.observe_generation(outcome, prompt_tokens=len(r.prompt_ids), cached_tokens=t.cached_tokens,
                                       completion_tokens=len(r.tokens), ttft_s=t.ttft_s,
                                       token_latencies_s=t.token_latencies_s[1:], queue_wait_s=job.queue_wait_s)
        metrics.refresh_cache()

    return observe


def build(session, options: ServeOptions, on_request=None):
    """Engine, metrics and the ASGI app for one loaded session."""
    from moe_local.serve.app import ServeConfig, create_app

    lm = session.lm
    report = getattr(lm.provider, "report", None)
    metrics = Metrics({"model": options.model_name, "family": lm.model.family, "device": str(lm.device),
                       "dtype": str(lm.dtype).removeprefix("torch."),
                       "experts": "tiered" if callable(report) else "resident"},
                      cache_report=report if callable(report) else None)
    ctx = options.ctx_size or min(session.generator.context_length, DEFAULT_CTX)
    if ctx > session.generator.context_length:
        raise MoeLocalError(f"--ctx-size {ctx} is larger than the model's context "
                            f"({session.generator.context_length} tokens)")
    engine = Engine(session, max_queue=options.max_queue, ctx_size=ctx, on_result=observe_job(metrics),
                    on_token=metrics.refresh_cache)
    app = create_app(engine, metrics, ServeConfig(options.model_name, options.api_key), on_request)
    return engine, metrics, app


def serve(app, engine: Engine, sock: socket.socket, on_ready: Callable[[], None] | None = None) -> None:
    """Listen on `sock` and serve until SIGINT/SIGTERM; returns after a graceful shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            self._loop = asyncio.get_running_loop()
            if self.started and on_ready is not None:
                on_ready()

        def handle_exit(self, sig: int, frame) -> None:
            # Not recorded for re-raising (see the module docstring); the engine is stopped on the loop,
            # since a signal handler must not take the locks the loop may be holding.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            loop = getattr(self, "_loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(engine.stop)

    config = uvicorn.Config(app, log_config=None, access_log=False, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, ws="none")
    try:
        Server(config).run(sockets=[sock])
    finally:
        # After a forced quit uvicorn skips the lifespan shutdown: the worker must still be stopped
        # before the caller closes the session under it (a prefill in progress cannot be interrupted).
        engine.stop()
        engine.join(GRACEFUL_SHUTDOWN_S)
