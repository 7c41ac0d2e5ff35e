"""The FastAPI app: OpenAI-compatible endpoints over one engine and one worker thread (which
decodes up to ``max_num_seqs`` requests together with the continuous-batching scheduler, or one at
a time; worker.py).

Flow of a generation request: check the API key, read the body (413 past ``max_body_bytes``, a
client hanging up meanwhile is a 499), parse and validate it (pydantic), check the model name,
tokenize the prompt and check it against the context on a tokenizer thread (prompts.py; 400s),
queue a ``Job`` for the worker (429 when the queue is full), wait for the worker to accept it
(any other refusal by the engine turns into a 400 here, before any byte of a stream is sent),
then answer with one JSON body or a server-sent-event stream. While waiting, a task watches for
the client disconnecting, which cancels the job.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..batching import BatchLimits
from .. import checks as opt
from ..errors import InvalidArgument
from ..reasoning import ReasoningPrompt, check_suffix
from .metrics import BatchStats, Metrics
from .prompts import PromptEncoder, fit_max_tokens
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, Formatter, speculative, validation_error
from .worker import BatchWorker, GenerationRequest, Job, QueueFull, Worker, WorkerStopped

log = logging.getLogger("specdecode.server")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the context's end
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: pass temperature=0 for greedy (and lossless-equal) output
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a context's worth of text many times over
DEFAULT_MAX_NUM_SEQS = 8  # requests decoded together; 1 = one at a time
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


class _ClientGone(Exception):
    pass


class ServerState:
    def __init__(
        self, engine, *, model_name: str, aliases: tuple[str, ...], api_key: str | None, max_queue: int,
        limits: BatchLimits | None = None, reasoning_suffix: str | None = None,
    ):  # fmt: skip
        limits = limits or BatchLimits(DEFAULT_MAX_NUM_SEQS)
        self.engine = engine
        # Whisper's suffix for every request that sends none (serve -o reasoning_suffix=...).
        self.reasoning_suffix = check_suffix(reasoning_suffix)
        self.model_name = model_name
        self.model_ids = {model_name, *aliases}  # names a request may use for the one served model
        self.api_key = api_key
        self.max_num_seqs = limits.max_num_seqs
        self.batch_stats: BatchStats | None = None
        self.batching_off_reason: str | None = None  # why requests run one at a time, if they do
        scheduler = None
        if limits.max_num_seqs == 1:
            self.batching_off_reason = "--max-num-seqs 1"
        else:
            try:
                scheduler = engine.batch(limits=limits)
            except InvalidArgument as e:  # a method or backend the scheduler refuses
                self.batching_off_reason = str(e)
                log.warning("continuous batching is off, requests run one at a time: %s", e)
        if scheduler is None:
            self.worker: Worker = Worker(engine, max_queue)
        else:
            self.batch_stats = BatchStats(scheduler.max_num_seqs, scheduler.max_batch_tokens)
            self.worker = BatchWorker(engine, max_queue, scheduler, self.batch_stats)
            log.info("continuous batching: up to %d sequences, %d tokens per step",
                     scheduler.max_num_seqs, scheduler.max_batch_tokens)  # fmt: skip
        self.prompts = PromptEncoder(engine)
        self.metrics = Metrics(model_name, engine.method)
        self.started = int(time.time())

    @property
    def batch_cache_bytes(self) -> int:
        """What the batched KV cache's slots hold now (each grown by need), 0 when not batching."""
        cache = getattr(getattr(self.worker, "scheduler", None), "cache", None)
        return 0 if cache is None else cache.nbytes

    @property
    def memory(self) -> dict[str, int]:
        """/health's view of memory, in bytes: the target's weights, the drafter's own (a quantized
        copy, a draft model and its cache), the KV caches (the lone one, the batch's slots)."""
        target = self.engine.target
        return {"weights_bytes": getattr(target, "weight_bytes", 0), "drafter_bytes": self.engine.drafter.nbytes,
                "kv_cache_bytes": target.cache_bytes + self.batch_cache_bytes}  # fmt: skip

    @property
    def batching(self) -> dict[str, Any]:
        """/health's view of the batching: on or off (and why), its limits, what its steps held."""
        w = self.worker
        if self.batch_stats is None:
            return {"enabled": False, "reason": self.batching_off_reason, "max_num_seqs": 1}
        return {"enabled": True, "max_num_seqs": w.scheduler.max_num_seqs,
                "max_batch_tokens": w.scheduler.max_batch_tokens, "prefill_chunk": w.scheduler.prefill_chunk,
                "kv_cache_budget_bytes": w.scheduler.limits.kv_cache_bytes,
                "kv_cache_bytes": self.batch_cache_bytes,
                **self.batch_stats.summary()}  # fmt: skip

    # ---- request checks -----------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model not in self.model_ids:
            raise APIError(
                404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model", code="model_not_found",
            )  # fmt: skip

    def _busy(self) -> APIError:
        return APIError(
            429, f"the server is busy: {self.worker.max_queue} requests are already waiting (--max-queue); retry later",
            type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"},
        )  # fmt: skip

    def reasoning(self, req) -> ReasoningPrompt:
        """What the request asks to be written into its prompt: TokenSkip's ratio, and Whisper's
        suffix (the request's own; "" for none; absent: the server's default)."""
        suffix = self.reasoning_suffix if req.reasoning_suffix is None else req.reasoning_suffix
        try:
            return ReasoningPrompt(req.cot_ratio, check_suffix(suffix))
        except InvalidArgument as e:
            raise APIError(400, str(e), param=e.argument, code="invalid_value") from None

    async def prepare(
        self, req, prompt, max_tokens: int | None, default_max_tokens: int | None, *, chat: bool
    ) -> GenerationRequest:
        """Tokenize and check the prompt off the worker thread; the request the worker gets.
        ``prompt`` already holds what ``reasoning`` wrote into it."""
        w = self.worker
        if w.queue_length >= w.max_queue or self.prompts.pending >= w.max_queue:
            raise self._busy()  # before spending time on the prompt
        if not w.alive:
            raise _unavailable()
        try:
            ids = await self.prompts.encode(prompt)
            max_tokens = fit_max_tokens(len(ids), self.engine.target.max_length, max_tokens, default_max_tokens)
        except InvalidArgument as e:
            raise _to_api_error(e, chat=chat) from None
        return GenerationRequest(
            prompt=ids,
            max_tokens=max_tokens,
            default_max_tokens=None,
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=req.seed,
            stop=req.stop,
            stream=bool(req.stream),
        )

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request, asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except QueueFull:
            raise self._busy() from None
        except WorkerStopped:
            raise _unavailable() from None
        return job

    # ---- running a job ------------------------------------------------------------------------
    async def generate(self, http: Request, gen: GenerationRequest, fmt: Formatter, include_usage: bool) -> Response:
        job = self.submit(gen)
        watcher = asyncio.create_task(_wait_for_disconnect(http))
        finished = False
        try:
            kind, value = await _next_event(job, watcher)
            if kind == "error":
                raise _to_api_error(value, chat=fmt.chat)
            if gen.stream:
                # The stream's own machinery (starlette) listens for the disconnect from here on.
                watcher.cancel()
                finished = True  # the stream response now owns the job
                return _EventStream(self._events(job, fmt, include_usage), job)
            while kind != "done":
                kind, value = await _next_event(job, watcher)
                if kind == "error":
                    raise _to_api_error(value, chat=fmt.chat)
            finished = True
            spec = self._observe(job, value)
            return JSONResponse(fmt.response(value, spec))
        except _ClientGone:
            # Nobody will read this; 499 (nginx's "client closed request") shows up in the metrics.
            return Response(status_code=499)
        finally:
            watcher.cancel()
            if not finished:
                job.cancel()  # frees the worker if the job is still queued or running

    async def _events(self, job: Job, fmt: Formatter, include_usage: bool) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer, ending with ``data: [DONE]``."""
        try:
            if fmt.chat:
                yield _sse(fmt.chunk(role=True))
            pending = None  # an event taken off the queue while joining pieces
            while True:
                kind, value = pending or await job.events.get()
                pending = None
                if kind == "piece":
                    # Join the pieces already waiting: fewer, larger events when the client lags.
                    pieces = [value]
                    while not job.events.empty():
                        event = job.events.get_nowait()
                        if event[0] != "piece":
                            pending = event
                            break
                        pieces.append(event[1])
                    yield _sse(_with_usage(fmt.chunk("".join(pieces)), include_usage))
                elif kind == "done":
                    spec = self._observe(job, value)
                    last = _with_usage(fmt.chunk(finish_reason=value.finish_reason), include_usage)
                    last["speculative"] = spec
                    yield _sse(last)
                    if include_usage:
                        yield _sse(fmt.usage_chunk(value, spec))
                    break
                else:  # an error after the stream began: the status is sent already, so say it in-band
                    yield _sse(_to_api_error(value, chat=fmt.chat).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a no-op when finished; stops the worker when the client left mid-stream

    def _observe(self, job: Job, result) -> dict[str, Any]:
        now = time.perf_counter()
        ttft = job.first_piece_at - job.submitted_at if job.first_piece_at is not None else None
        self.metrics.observe(result, latency=now - job.submitted_at, ttft=ttft, queue_wait=job.queue_time)
        return speculative(self.engine.method, result, job.queue_time)


class _EventStream(StreamingResponse):
    """A text/event-stream response that cancels its job however the response ends."""

    def __init__(self, content: AsyncIterator[str], job: Job):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _with_usage(chunk: dict, include_usage: bool) -> dict:
    if include_usage:  # OpenAI: with include_usage every chunk has "usage", null but in the last
        chunk["usage"] = None
    return chunk


async def _wait_for_disconnect(http: Request) -> None:
    # The body is read already, so the next ASGI message can only be the disconnect.
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


async def _next_event(job: Job, watcher: asyncio.Task) -> tuple[str, Any]:
    getter = asyncio.ensure_future(job.events.get())
    await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    raise _ClientGone()


def _unavailable() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="unavailable")


def _to_api_error(e: BaseException, *, chat: bool) -> APIError:
    if isinstance(e, InvalidArgument):
        # Engine names -> request names; the prompt of a chat request is its messages.
        param = {"max_new_tokens": "max_tokens"}.get(e.argument, e.argument)
        if chat and param == "prompt":
            param = "messages"
        detail = str(e).split(": ", 1)[1] if str(e).startswith(f"{e.argument}: ") else str(e)
        return APIError(400, f"{param}: {detail}", param=param, code="invalid_value")
    if isinstance(e, WorkerStopped):
        return _unavailable()
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error", code="internal_error")


async def _read_body(http: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading the rest: at once when
    Content-Length says so, else as soon as the bytes that came in pass it (chunked uploads).
    A client hanging up meanwhile raises ClientDisconnect (answered 499)."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(f"the request body has {int(declared)} bytes", limit)
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"the request body has more than {limit} bytes", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(what: str, limit: int) -> APIError:
    # Connection: close -- the rest of the body is not read, so the connection cannot be reused.
    return APIError(
        413, f"{what}; this server takes at most {limit} (--max-body-bytes)", code="request_too_large",
        headers={"Connection": "close"},
    )  # fmt: skip


def _parse(model: type[BaseModel], body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e, model, body) from None


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _CountRequests:
    """Pure ASGI middleware counting answers by endpoint and status (it does not wrap streams
    the way BaseHTTPMiddleware does, so disconnects still reach the stream)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
            self.metrics.count_request(endpoint, status)


def create_app(
    engine,
    *,
    model_name: str | None = None,
    aliases: tuple[str, ...] = (),
    api_key: str | None = None,
    max_queue: int = 64,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    max_batch_tokens: int | None = None,
    prefill_chunk: int | None = None,
    kv_cache_bytes: int | None = None,
    reasoning_suffix: str | None = None,
) -> FastAPI:
    """An app serving ``engine`` (loaded once); its worker thread runs while the app does.
    Request bodies over ``max_body_bytes`` are refused with 413.

    With ``max_num_seqs`` > 1 up to that many requests are decoded together by the engine's
    continuous-batching scheduler (``Engine.batch``; ``max_batch_tokens`` decoding rows per step,
    default from the target's cost model, and up to ``prefill_chunk`` prompt tokens). Methods and
    backends the scheduler refuses (those the drafter registry declares not ``batchable``, auto;
    the hf backend) run one request at a time, as ``max_num_seqs=1`` does; /health says which and
    why. ``kv_cache_bytes``: what the running requests' KV caches may hold together (a request that
    could never fit is refused with 400, one that does not fit now waits). The limits are checked
    here, so that a bad one is an error rather than a fallback. ``reasoning_suffix``: Whisper's
    suffix for requests that send no ``reasoning_suffix`` of their own (docs/whisper.md)."""
    if max_queue < 1:
        raise InvalidArgument("max_queue", f"expected an integer >= 1, got {max_queue!r}")
    limits = BatchLimits.make(max_num_seqs, max_batch_tokens, prefill_chunk, kv_cache_bytes)
    opt.integer("max_body_bytes", max_body_bytes)
    state = ServerState(
        engine, model_name=model_name or engine.model_name, aliases=aliases, api_key=api_key or None,
        max_queue=max_queue, limits=limits, reasoning_suffix=reasoning_suffix,
    )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        yield
        state.worker.stop()
        state.prompts.close()

    app = FastAPI(title="specdecode", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))  # fmt: skip
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error_response(APIError(e.status_code, message, code=code, headers=getattr(e, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        return _error_response(APIError(422, str(e), code="invalid_type"))

    @app.exception_handler(ClientDisconnect)
    async def on_client_gone(request: Request, e: ClientDisconnect):
        # The client hung up while sending its body: a disconnect, not a server error.
        log.info("client hung up while sending the body of %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception):
        log.exception("unexpected error")
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error", code="internal_error"))  # fmt: skip

    def check_api_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")  # fmt: skip
        if not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "specdecode",
                "method": engine.method, "verify": engine.verify.describe(), "lossy": engine.verify.lossy}  # fmt: skip

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str):
        state.check_model(model_id)
        return model_card()

    @v1.post("/completions")
    async def completions(http: Request):
        req = _parse(CompletionRequest, await _read_body(http, max_body_bytes))
        state.check_model(req.model)
        req.check_supported()
        prompt, added = state.reasoning(req).apply(req.engine_prompt())
        gen = await state.prepare(req, prompt, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, chat=False)
        fmt = Formatter(chat=False, model=state.model_name, prompt_added=added)
        return await state.generate(http, gen, fmt, req.include_usage)

    @v1.post("/chat/completions")
    async def chat_completions(http: Request):
        req = _parse(ChatCompletionRequest, await _read_body(http, max_body_bytes))
        state.check_model(req.model)
        req.check_supported()
        messages = [m.engine_message() for m in req.messages]
        messages, added = state.reasoning(req).apply(messages)
        gen = await state.prepare(req, messages, req.max_new_tokens, None, chat=True)
        fmt = Formatter(chat=True, model=state.model_name, prompt_added=added)
        return await state.generate(http, gen, fmt, req.include_usage)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        w = state.worker
        body = {"status": "ok" if w.alive else "unavailable", "model": state.model_name, "method": engine.method,
                "verify": engine.verify.describe(), "lossy": engine.verify.lossy,
                "queue_length": w.queue_length, "running": w.running, "worker_thread": w.thread_name,
                "batching": state.batching, "memory": state.memory}  # fmt: skip
        return JSONResponse(body, status_code=200 if w.alive else 503)

    @app.get("/metrics")
    async def metrics():
        w = state.worker
        text = state.metrics.render(queue_length=w.queue_length, running=w.running, cancelled=w.cancelled_total,
                                    batch=state.batch_stats)  # fmt: skip
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_CountRequests, metrics=state.metrics)
    return app

