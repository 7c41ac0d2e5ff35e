"""The one thread that talks to the engine, and the bounded queue that feeds it.

The engine (model, KV cache, drafter state) is not thread-safe, so everything that runs the
model runs here, one request at a time. Prompts come tokenized and checked already (prompts.py:
on threads of their own, with their own copies of the tokenizer, so a huge prompt holds up no
one); the worker checks token ids again, which is cheap, and tokenizes whatever else it is
given (a direct caller's text) with the engine's own tokenizer. The event loop only moves messages:
a job carries an asyncio queue that the worker fills through ``call_soon_threadsafe``, and a
``cancelled`` flag that the event loop sets when the client goes away, which the worker checks
between pieces and then closes the engine's stream.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument
from .prompts import encode, fit_max_tokens

log = logging.getLogger("specdecode.server")


@dataclass
class GenerationRequest:
    """What the worker needs to run one request (already checked for shape by pydantic)."""

    prompt: str | list[dict] | list[int]
    max_tokens: int | None  # as asked; must fit in the context with the prompt
    default_max_tokens: int | None  # when max_tokens is None; None = up to the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False  # send every piece, not just the result


class QueueFull(Exception):
    pass


class WorkerStopped(Exception):
    pass


class Job:
    """One request on its way through the worker.

    Events, in order: ("start", (prompt_tokens, max_tokens)) once the request is accepted by the
    engine, then ("piece", text)* for streamed jobs, then ("done", GenerationResult); or
    ("error", exception) at any point instead.
    """

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.stopped_by_server = False  # cancelled by Worker.stop, not by the client leaving
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None  # the worker took it
        self.first_piece_at: float | None = None

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def queue_time(self) -> float:
        return (self.started_at or self.submitted_at) - self.submitted_at


class Worker:
    def __init__(self, engine, max_queue: int):
        self.engine = engine
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.max_queue = max_queue
        self._thread = threading.Thread(target=self._loop, name="specdecode-worker", daemon=True)
        self._stopping = False
        self.current: Job | None = None
        self.cancelled_total = 0  # generations stopped because their client left

    # ---- event-loop side ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def queue_length(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self.current is not None

    def submit(self, job: Job) -> None:
        if not self.alive:
            raise WorkerStopped()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current piece; jobs still waiting are told the server is going away."""
        self._stopping = True
        current = self.current
        if current is not None:
            current.stopped_by_server = True
            current.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", WorkerStopped())
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:  # pragma: no cover - only if submit raced past _stopping
            pass
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- worker-thread side -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():  # the client left while waiting: nothing to do
                self.cancelled_total += 1
                continue
            job.started_at = time.perf_counter()
            self.current = job
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - the request fails, the worker lives on
                if not isinstance(e, InvalidArgument):
                    log.exception("generation failed")
                job.emit("error", e)
            finally:
                self.current = None

    def _run(self, job: Job) -> None:
        r, engine = job.request, self.engine
        prompt_ids = encode(engine, r.prompt)
        max_tokens = fit_max_tokens(len(prompt_ids), engine.target.max_length, r.max_tokens, r.default_max_tokens)
        stream = engine.stream(
            prompt_ids, max_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            seed=r.seed, stop=r.stop,
        )  # fmt: skip
        job.emit("start", (len(prompt_ids), max_tokens))
        try:
            for piece in stream:
                if job.first_piece_at is None:
                    job.first_piece_at = time.perf_counter()
                if job.cancelled.is_set():
                    break
                if r.stream:
                    job.emit("piece", piece)
        finally:
            stream.close()  # stops the engine's generator if we left early; a no-op otherwise
        if stream.result is None:  # left early
            if job.stopped_by_server:  # the server is shutting down: tell the client so
                job.emit("error", WorkerStopped())
            else:  # the client is gone
                self.cancelled_total += 1
            return
        job.emit("done", stream.result)

