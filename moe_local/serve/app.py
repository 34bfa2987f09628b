"""The HTTP side: a Starlette app over one Engine, speaking the OpenAI API (SSE for streams).

Handlers validate and tokenize on the event loop (cheap), hand the ids to the engine and relay its
events. While a request waits in the queue or its reply is computed, the handler also watches the
connection: a client that goes away cancels its job (removed from the queue, or stopped after the
current token). Once a stream has started, Starlette itself watches for the disconnect and cancels
the body iterator, whose `finally` cancels the job.

Streaming responses send their headers only when the job starts, so a request that is refused
while it waits (the server shutting down) still gets a proper 503 rather than a broken stream.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moe_local.errors import MoeLocalError
from moe_local.serve.engine import Engine, Job
from moe_local.serve.metrics import CONTENT_TYPE, Metrics
from moe_local.serve.protocol import (ApiError, ParsedRequest, Reply, finish_reason, model_object, parse_chat,
                                      parse_completion, parse_json, usage)

# Paths that may be reached without the API key: liveness probes carry no credentials (as in llama-server).
PUBLIC_PATHS = ("/health",)
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


@dataclass
class ServeConfig:
    model_name: str  # what clients put in "model" and see in /v1/models
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class RequestRecord:
    """What the log line of one request shows (the CLI renders it)."""

    method: str
    path: str
    status: int = 0
    seconds: float = 0.0
    prompt_tokens: int | None = None  # set for generations only
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    gen_tps: float | None = None
    queue_wait_s: float = 0.0
    finish: str | None = None  # stop | length | cancelled | error


class Disconnected(Exception):
    """The client closed the connection before its response was complete."""


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class _Observe:
    """Outermost ASGI layer: the API key, the per-request record, metrics and the log line."""

    def __init__(self, app, config: ServeConfig, metrics: Metrics,
                 on_request: Callable[[RequestRecord], None] | None) -> None:
        self.app = app
        self.config = config
        self.metrics = metrics
        self.on_request = on_request

    def _authorized(self, scope) -> bool:
        if self.config.api_key is None or scope["path"] in PUBLIC_PATHS:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.config.api_key.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        record = RequestRecord(scope["method"], scope["path"])
        scope["moe_local.record"] = record

        async def observe_send(message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            if self._authorized(scope):
                await self.app(scope, receive, observe_send)
            else:
                given = any(k == b"authorization" for k, _ in scope.get("headers") or [])
                msg = ("Incorrect API key provided" if given else
                       "You didn't provide an API key: send it as 'Authorization: Bearer KEY'")
                await error_response(ApiError(401, msg, code="invalid_api_key"))(scope, receive, observe_send)
        finally:
            record.seconds = time.perf_counter() - t0
            path = record.path if record.path in ROUTES else "other"  # bounded label values
            self.metrics.observe_request(record.method, path, record.status or 499, record.seconds)
            if self.on_request is not None:
                self.on_request(record)


def create_app(engine: Engine, metrics: Metrics, config: ServeConfig,
               on_request: Callable[[RequestRecord], None] | None = None) -> Any:
    """The ASGI app. Its lifespan starts the engine's worker and stops it (in-flight reply ended) at shutdown."""
    session = engine.session

    # -------------------------------------------------------------- helpers
    def check_model(name: str) -> None:
        if name != config.model_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{config.model_name}`",
                           param="model", code="model_not_found")

    async def body_of(request: Request) -> dict:
        return parse_json(await request.body())

    async def watch_disconnect(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def next_event(job: Job, watcher: asyncio.Task) -> tuple:
        get = asyncio.ensure_future(job.events.get())
        done, _ = await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        raise Disconnected

    def finish(record: RequestRecord, job: Job, n_tokens: int) -> None:
        result = job.result
        record.queue_wait_s = job.queue_wait_s
        record.completion_tokens = n_tokens
        if result is not None:
            t = result.timings
            record.cached_tokens = t.cached_tokens
            record.ttft_s = t.ttft_s if t.generated_tokens else None
            record.gen_tps = t.gen_tps
        if job.cancelled:
            record.finish = "cancelled"
        elif job.error is not None:
            record.finish = "error"
        elif result is not None:
            record.finish = finish_reason(result.stop_reason)

    def usage_of(job: Job) -> dict:
        r = job.result
        assert r is not None
        return usage(len(r.prompt_ids), len(r.tokens), r.timings.cached_tokens)

    async def generate(request: Request, req: ParsedRequest, ids: list[int], param: str) -> Response:
        engine.check_prompt(ids, param)
        record: RequestRecord = request.scope["moe_local.record"]
        record.prompt_tokens = len(ids)
        job = engine.submit(ids, req.options)
        reply = Reply(req.kind, config.model_name)
        watcher = asyncio.ensure_future(watch_disconnect(request.receive))
        n_tokens = 0
        texts: list[str] = []
        try:
            first = await next_event(job, watcher)
            if first[0] == "error":
                finish(record, job, 0)
                raise first[1]
            if req.stream:
                watcher.cancel()  # from here on Starlette's StreamingResponse watches the connection
                return StreamingResponse(stream(job, req, reply, record), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            while True:
                kind, *payload = await next_event(job, watcher)
                if kind == "token":
                    n_tokens += 1
                    texts.append(payload[0].text)
                elif kind == "error":
                    finish(record, job, n_tokens)
                    raise payload[0]
                else:
                    finish(record, job, n_tokens)
                    return JSONResponse(reply.full("".join(texts), record.finish or "stop", usage_of(job)))
        except Disconnected:
            job.cancel()
            finish(record, job, n_tokens)
            return Response(status_code=499)  # nobody reads it; the status is for the log line
        finally:
            watcher.cancel()

    async def stream(job: Job, req: ParsedRequest, reply: Reply, record: RequestRecord) -> AsyncIterator[bytes]:
        n_tokens = 0
        done = False
        try:
            if req.kind == "chat":
                yield _sse(reply.chunk(None, first=True, include_usage=req.include_usage))
            while True:
                kind, *payload = await job.events.get()
                if kind == "token":
                    n_tokens += 1
                    if payload[0].text:
                        yield _sse(reply.chunk(payload[0].text, include_usage=req.include_usage))
                    continue
                done = True
                finish(record, job, n_tokens)
                if kind == "error":
                    yield _sse(payload[0].body())
                else:
                    yield _sse(reply.chunk(None, record.finish, include_usage=req.include_usage))
                    if req.include_usage:
                        yield _sse(reply.usage_chunk(usage_of(job)))
                yield b"data: [DONE]\n\n"
                return
        finally:
            if not done:  # the client went away (Starlette cancelled us): stop the generation
                job.cancel()
                finish(record, job, n_tokens)

    # -------------------------------------------------------------- endpoints
    async def chat_completions(request: Request) -> Response:
        req = parse_chat(await body_of(request))
        check_model(req.model)
        try:
            ids = session.chat_ids(req.messages)
        except MoeLocalError as exc:  # e.g. the template rejects the roles
            raise ApiError(400, str(exc), param="messages", code="invalid_value") from None
        return await generate(request, req, ids, "messages")

    async def completions(request: Request) -> Response:
        req = parse_completion(await body_of(request))
        check_model(req.model)
        ids = req.prompt_ids if req.prompt_ids is not None else session.prompt_ids(req.prompt_text)
        return await generate(request, req, ids, "prompt")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_object(config.model_name, config.created)]})

    async def one_model(request: Request) -> Response:
        check_model(request.path_params["model"])
        return JSONResponse(model_object(config.model_name, config.created))

    async def health(request: Request) -> Response:
        if engine.stopping:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": config.model_name, "queue_depth": engine.queue_depth,
                             "running": engine.running})

    async def metrics_text(request: Request) -> Response:
        text = metrics.render(queue_depth=engine.queue_depth, running=engine.running, max_queue=engine.max_queue,
                              ctx_size=engine.ctx_size, kv_tokens=engine.cached_tokens)
        return Response(text, media_type=CONTENT_TYPE)

    # -------------------------------------------------------------- errors and lifespan
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(ApiError(exc.status_code, message, code=code))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    def lifespan(app):
        class _Lifespan:
            async def __aenter__(self):
                engine.start()

            async def __aexit__(self, *exc):
                engine.stop()
                await asyncio.get_running_loop().run_in_executor(None, engine.join, 60.0)

        return _Lifespan()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", one_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    return _Observe(app, config, metrics, on_request)
