"""The one thread that talks to the engine, and the bounded queue that feeds it.

The engine (model, KV cache, drafter state) is not thread-safe, so everything that runs the
model runs here: one request at a time (``Worker``), or many decoded together by the
continuous-batching scheduler (``BatchWorker``). Prompts come tokenized and checked already (prompts.py:
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
from collections import deque
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
        # Continuous batching (BatchWorker): the text sent to the client, the text a replay must
        # repeat without sending it, and whether the job was answered while its request leaves.
        self.sent = ""
        self.skip = ""
        self.answered = False

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
        # True: the caller runs the loop itself (``run_here``, from the process's main thread)
        # instead of the worker's own thread. On CPU with torch's bundled GNU OpenMP, every op
        # issued from a thread other than the main one ran ~2x slower here (a 2-row product of
        # SmolLM2's MLP: 180 us vs 78 us; the same for elementwise ops), so `specdecode serve`
        # runs the model on the main thread and the HTTP server on another.
        self.driven_by_caller = False
        self.thread_name: str | None = None  # the thread running the loop, once it runs (/health)
        self._stopping = False
        self.current: Job | None = None
        self.cancelled_total = 0  # generations stopped because their client left

    # ---- event-loop side ----------------------------------------------------------------------
    def start(self) -> None:
        if not self.driven_by_caller:
            self.thread_name = self._thread.name
            self._thread.start()

    def run_here(self) -> None:
        """Run the worker's loop in the calling thread until ``stop`` (with ``driven_by_caller``)."""
        self.thread_name = threading.current_thread().name
        self._loop()

    @property
    def alive(self) -> bool:
        running = self.driven_by_caller or self._thread.is_alive()
        return running and not self._stopping

    @property
    def queue_length(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self.current is not None

    @property
    def running(self) -> int:
        """Requests being generated now."""
        return int(self.current is not None)

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
        self._close_queue(timeout)

    def _close_queue(self, timeout: float) -> None:
        """Tell the jobs still waiting that the server is going away, then end the thread."""
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



class BatchWorker(Worker):
    """The worker over a continuous-batching scheduler (batching.py): up to ``max_num_seqs``
    requests decode together, one target forward per step.

    Jobs wait in the same bounded queue; the worker takes one whenever the scheduler has a free
    slot, so ``queue_length`` still counts requests waiting for a slot (and a full queue still
    answers 429). Requests join and leave at step boundaries: a job whose client left is
    cancelled before the next step, which frees its slot. Each step's text goes to its job as it
    comes (streamed jobs get it piece by piece).

    Errors stay with their request. A request the scheduler refuses when it joins fails alone. A
    step that raises cannot say whose fault it was, so the scheduler is rebuilt empty and the
    requests that were in it are replayed one at a time from their prompts (the queue waits
    meanwhile): the one that fails alone is the culprit and gets the error; the others finish. A
    replay sends on only the text its client has not had yet, after checking that it begins with
    what was sent; a request that cannot be replayed exactly (a streamed one sampling without a
    seed that has sent text already) fails with the error too.
    """

    def __init__(self, engine, max_queue: int, scheduler, stats=None):
        super().__init__(engine, max_queue)
        self.scheduler = scheduler
        self.stats = stats  # metrics.BatchStats, fed after every step
        self._jobs: dict[int, tuple[Job, object]] = {}  # request id -> (job, handle)
        self._suspects: deque[Job] = deque()  # to replay one at a time after a failed step
        self._replaying: Job | None = None
        self._thread.name = "specdecode-batch-worker"

    @property
    def running(self) -> int:
        return len(self._jobs)

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        for job, _ in list(self._jobs.values()):
            job.stopped_by_server = True
            job.cancel()
        self._close_queue(timeout)

    # ---- worker-thread side -------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                if self._stopping:
                    return
                if not self._take_jobs():
                    return
                if self._stopping:
                    return
                if not self.scheduler.has_work:
                    continue
                for job, handle in self._jobs.values():
                    if job.cancelled.is_set():
                        self.scheduler.cancel(handle)
                try:
                    outputs = self.scheduler.step()
                except Exception as e:  # noqa: BLE001 - its request fails, the worker lives on
                    self._after_failed_step(e)
                    continue
                if self.stats is not None:
                    self.stats.observe_step(self.scheduler.last_step, self.scheduler.max_batch_tokens)
                for out in outputs:
                    self._deliver(out)
        finally:
            for job in [job for job, _ in self._jobs.values() if not job.answered] + list(self._suspects):
                job.emit("error", WorkerStopped())  # the server is going away
            self._jobs.clear()
            self._suspects.clear()

    def _take_jobs(self) -> bool:
        """Move queued jobs into the scheduler while it has room (waiting for one when it has no
        work), or the next suspect to replay alone. False when the stop sentinel came."""
        s = self.scheduler
        if self._replaying is not None or self._suspects:
            if s.has_work:
                return True  # a replay runs alone
            self._replaying = None
            while self._suspects and self._replaying is None:
                job = self._suspects.popleft()
                if job.cancelled.is_set():
                    self._left(job)
                elif self._admit(job, replay=True):
                    self._replaying = job
            if self._replaying is not None:
                return True
        while len(s.running) + len(s.waiting) < s.max_num_seqs:
            try:
                job = self._queue.get() if not s.has_work else self._queue.get_nowait()
            except queue.Empty:
                return True
            if job is None or self._stopping:
                if job is not None:
                    job.emit("error", WorkerStopped())
                return False
            if job.cancelled.is_set():  # the client left while waiting: nothing to do
                self.cancelled_total += 1
                continue
            self._admit(job)
        return True

    def _admit(self, job: Job, replay: bool = False) -> bool:
        r = job.request
        try:
            prompt_ids = encode(self.engine, r.prompt)
            max_tokens = fit_max_tokens(len(prompt_ids), self.engine.target.max_length, r.max_tokens, r.default_max_tokens)
            handle = self.scheduler.submit(
                prompt_ids, max_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=r.seed,
                stop=r.stop,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            if not isinstance(e, InvalidArgument):
                log.exception("generation failed")
            job.emit("error", e)
            return False
        self._jobs[handle.id] = (job, handle)
        if not replay:
            job.started_at = time.perf_counter()
            job.emit("start", (len(prompt_ids), max_tokens))
        return True

    def _deliver(self, out) -> None:
        entry = self._jobs.get(out.request.id)
        if entry is None:  # pragma: no cover - every request in the scheduler has a job
            return
        job, handle = entry
        if job.answered:  # dropped already (an error was sent); its request is leaving
            if out.finished:
                del self._jobs[out.request.id]
            return
        text = out.text
        if job.skip and text:  # a replay: what the client has had already must come again
            n = min(len(text), len(job.skip))
            if text[:n] != job.skip[:n]:
                return self._drop(job, handle, RuntimeError("a replayed request diverged from the text it had sent"))
            job.skip, text = job.skip[n:], text[n:]
        if text and job.first_piece_at is None:
            job.first_piece_at = time.perf_counter()
        if text and job.request.stream and not job.cancelled.is_set():
            job.emit("piece", text)
            job.sent += text
        if not out.finished:
            return
        del self._jobs[out.request.id]
        result = handle.result
        if result.finish_reason == "cancelled":
            self._left(job)
        elif job.skip:
            job.emit("error", RuntimeError("a replayed request diverged from the text it had sent"))
        else:
            job.emit("done", result)

    def _left(self, job: Job) -> None:
        """A job that ended because it was cancelled: by its client, or by the server stopping."""
        if job.stopped_by_server:
            job.emit("error", WorkerStopped())
        else:  # the client is gone
            self.cancelled_total += 1

    def _drop(self, job: Job, handle, error: Exception) -> None:
        self.scheduler.cancel(handle)  # it leaves at the next step, its output going nowhere
        job.answered = True
        job.emit("error", error)

    def _after_failed_step(self, error: Exception) -> None:
        """Rebuild the scheduler; fail the step's request when it ran alone, else replay them all
        one at a time (see the class docstring)."""
        jobs = [job for job, _ in self._jobs.values() if not job.answered]
        self._jobs.clear()
        old = self.scheduler
        self.scheduler = type(old)(self.engine, max_num_seqs=old.max_num_seqs, max_batch_tokens=old.max_batch_tokens,
                                   prefill_chunk=old.prefill_chunk)  # fmt: skip
        if len(jobs) <= 1:
            log.error("a batched step failed; its one request fails", exc_info=error)
            self._replaying = None
            for job in jobs:
                job.emit("error", error)
            return
        log.warning("a batched step failed (%s: %s); replaying its %d requests one at a time to find the one at fault",
                    type(error).__name__, error, len(jobs))  # fmt: skip
        for job in jobs:
            r = job.request
            if job.sent and not (r.temperature == 0 or r.seed is not None):  # cannot repeat what it sent
                job.emit("error", error)
            else:
                job.skip = job.sent
                self._suspects.append(job)

