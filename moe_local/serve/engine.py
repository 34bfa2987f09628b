"""The one worker that owns the model: a FIFO of jobs, run one at a time (batch 1 is the workload).

HTTP handlers run on the server's event loop; generation runs here, on one thread, so the loop
stays free to accept requests, answer /metrics and notice disconnects while a reply is computed.
A `Job` carries its events back to the loop through an asyncio queue filled with
`call_soon_threadsafe`: ("start",), then ("token", TokenEvent) per token, then ("done", result) or
("error", exception).

- Prefix reuse: every job goes through the same `Generator`, whose KV cache keeps the previous
  sequence; a chat client re-sending its conversation only prefills the new turn. The cache is
  allocated once, for `ctx_size` positions, when the engine starts.
- Cancellation: `Job.cancel()` (the client went away) removes a waiting job from the queue, or makes
  the running one stop after the token being computed — checked after every token.
- Shutdown: `stop()` refuses new jobs, fails the waiting ones with 503 and stops the running one
  after its current token; its client still gets a final chunk. The worker then exits.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from moe_local.errors import MoeLocalError
from moe_local.runtime.generate import GenerateOptions, GenerationResult
from moe_local.serve.protocol import ApiError


@dataclass
class Job:
    prompt_ids: list[int]
    options: GenerateOptions
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    cancelled: bool = False  # the client went away: stop (or never start)
    stopped_by_shutdown: bool = False
    result: GenerationResult | None = None
    error: ApiError | None = None
    _engine: "Engine | None" = None

    def cancel(self) -> None:
        """Called on the loop when the client disconnects; harmless after the job has finished."""
        self.cancelled = True
        if self._engine is not None:
            self._engine._forget(self)

    @property
    def queue_wait_s(self) -> float:
        return (self.started or time.perf_counter()) - self.submitted

    def _send(self, *item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Engine:
    """Runs jobs one at a time on a worker thread; at most `max_queue` wait behind the running one."""

    def __init__(self, session, *, max_queue: int = 64, ctx_size: int | None = None,
                 on_result: Callable[[Job], None] | None = None,
                 on_token: Callable[[], None] | None = None) -> None:
        self.session = session
        self.max_queue = max_queue
        model_ctx = session.generator.context_length
        self.ctx_size = min(ctx_size or model_ctx, model_ctx)
        self.on_result = on_result  # metrics: called on the worker with each finished job
        self.on_token = on_token  # metrics: called on the worker after each token (live cache figures)
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._mean_s = 0.0  # running mean of job durations, for Retry-After
        self.last_result: GenerationResult | None = None  # for --stats-json at exit

    # ------------------------------------------------------------ state
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> bool:
        return self._running is not None

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def cached_tokens(self) -> int:
        """Positions of the KV cache holding the previous sequence (what the next request may reuse):
        its prompt and every generated token but the last, which was sampled and never run."""
        r = self.last_result
        return 0 if r is None else len(r.prompt_ids) + max(len(r.tokens) - 1, 0)

    def check_prompt(self, ids: list[int], param: str) -> None:
        """A 400 for an empty prompt, a bad token id or a prompt that leaves no room to generate."""
        if len(ids) >= self.ctx_size:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but this server's context size is "
                                f"{self.ctx_size} tokens (it needs room for at least one generated token)",
                           param=param, code="context_length_exceeded")
        try:
            self.session.generator.check_prompt(ids)
        except MoeLocalError as exc:
            raise ApiError(400, str(exc), param=param, code="invalid_value") from None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Allocate the KV cache (so a too-large --ctx-size fails now, not mid-request) and start the worker."""
        self.session.generator.reserve(self.ctx_size)
        self._thread = threading.Thread(target=self._work, name="moe-local-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Refuse new jobs, fail the waiting ones, stop the running one after its current token."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cond.notify_all()
        for job in waiting:
            job._send("error", ApiError(503, "the server is shutting down", code="shutting_down"))

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------ jobs
    def submit(self, prompt_ids: list[int], options: GenerateOptions) -> Job:
        """Queue a job (call on the event loop); a full queue or a stopping server is a 503."""
        job = Job(prompt_ids, options, asyncio.get_running_loop())
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            busy = self._running is not None or self._waiting
            if busy and len(self._waiting) >= self.max_queue:
                retry = max(1, math.ceil(self._mean_s * (len(self._waiting) + 1)))
                raise ApiError(503, f"the server is busy: {len(self._waiting)} requests are waiting "
                                    f"(--max-queue {self.max_queue}); retry later", code="queue_full",
                               headers={"Retry-After": str(min(retry, 3600))})
            job._engine = self
            self._waiting.append(job)
            self._cond.notify()
        return job

    def _forget(self, job: Job) -> None:
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            job = self._waiting.popleft()
            self._running = job
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: Job) -> None:
        job.started = time.perf_counter()
        job._send("start")
        options = job.options
        # The generation may not outgrow the context this server allocated.
        room = self.ctx_size - len(job.prompt_ids)
        options = GenerateOptions(options.sampling, max_tokens=min(options.max_tokens or room, room),
                                  stop=options.stop, ignore_eos=options.ignore_eos)
        try:
            stream = self.session.stream(job.prompt_ids, options)
            for event in stream:
                job._send("token", event)
                if self.on_token is not None:
                    self.on_token()
                if job.cancelled or self._stopping:
                    job.stopped_by_shutdown = not job.cancelled
                    stream.close()
                    break
            job.result = self.last_result = stream.result
        except MoeLocalError as exc:
            job.error = ApiError(400, str(exc))
        except Exception as exc:  # a bug or a broken pack: the client gets a 500, the server keeps serving
            job.error = ApiError(500, f"generation failed: {type(exc).__name__}: {exc}")
        duration = time.perf_counter() - job.started
        self._mean_s = duration if self._mean_s == 0 else 0.8 * self._mean_s + 0.2 * duration
        if self.on_result is not None:
            self.on_result(job)
        if job.error is not None:
            job._send("error", job.error)
        else:
            job._send("done", job.result)
