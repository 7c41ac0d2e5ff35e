"""The ``specdecode serve`` command: load one engine, then run the app under uvicorn."""

from __future__ import annotations

import os
from typing import Optional

import typer

from ..cli_options import (  # the options shared with `generate`
    ADAPTER_OPTION,
    ADAPTIVE_OPTION, BACKEND_OPTION, DEVICE_OPTION, DRAFT_LENGTH_OPTION, DRAFT_MODEL_OPTION, DTYPE_OPTION,
    DRAFT_QUANT_OPTION, METHOD_OPTION, METHOD_OPTIONS_OPTION, MODEL_OPTION, QUANTIZE_OPTION, VERIFY_OPTION, fail,
    method_options,
)  # fmt: skip
from .. import checks as opt
from ..drafters import registry


def serve(
    model: str = MODEL_OPTION,
    method: str = METHOD_OPTION,
    draft_model: Optional[str] = DRAFT_MODEL_OPTION,
    draft_length: Optional[int] = DRAFT_LENGTH_OPTION,
    adaptive: Optional[bool] = ADAPTIVE_OPTION,
    option: Optional[list[str]] = METHOD_OPTIONS_OPTION,
    dtype: str = DTYPE_OPTION,
    backend: str = BACKEND_OPTION,
    device: str = DEVICE_OPTION,
    quantize: Optional[str] = QUANTIZE_OPTION,
    draft_quant: Optional[str] = DRAFT_QUANT_OPTION,
    verify: str = VERIFY_OPTION,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 exposes the server to the network)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(
        None, envvar="SPECDECODE_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 endpoints."
    ),
    max_queue: int = typer.Option(64, min=1, help="Requests that may wait for the worker; more get 429."),
    max_body_bytes: int = typer.Option(
        4 * 1024 * 1024, min=1, help="Largest request body accepted, in bytes; larger ones get 413."
    ),
    max_num_seqs: int = typer.Option(
        8, min=1, help="Requests decoded together by the continuous-batching scheduler (default 8); "
        f"1 = one at a time. Methods the scheduler refuses ({', '.join(registry.names(batchable=False))}, auto) "
        "and the hf backend run one at a time whatever this says.",
    ),  # fmt: skip
    max_batch_tokens: Optional[int] = typer.Option(
        None, min=1, help="Token budget of one batched step's decoding rows: the running requests' roots and "
        "drafts (default: where the target's forward costs twice a one-token forward, from its cost model).",
    ),  # fmt: skip
    prefill_chunk: Optional[int] = typer.Option(
        None, min=1, help="Prompt tokens prefilled per batched step beside the decoding rows (default 512): "
        "longer prompts are prefilled in chunks so that they do not stall the running requests.",
    ),  # fmt: skip
    kv_cache_memory: Optional[str] = typer.Option(
        None, help="What the running requests' KV caches may hold together, e.g. 6GiB (default: half the memory "
        "free after loading). A request joins when what its prompt and max_tokens can reach fits; one that never "
        "can is refused with 400.",
    ),  # fmt: skip
    served_model_name: Optional[str] = typer.Option(
        None, help="The model name clients use (default: the --model folder's name)."
    ),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (default: torch's choice)."),
    log_level: str = typer.Option("info", help="uvicorn log level: debug, info, warning, error."),
    adapter: Optional[str] = ADAPTER_OPTION,
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    from ..engine import Engine
    from ..errors import SpecDecodeError

    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as e:
        fail(f"{e.name} is missing: install the server extra with  pip install 'specdecode[serve]'")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        from ..reasoning import ReasoningPrompt  # -o reasoning_suffix: the server's default (Whisper)
        from ..tokenskip.serving import refuse_server_ratio, with_adapter  # --adapter: merged at load (TokenSkip)

        reasoning, options = ReasoningPrompt.from_options(method_options(option))
        refuse_server_ratio(reasoning.cot_ratio)
        engine = Engine.from_pretrained(
            with_adapter(model, adapter), method, draft_model=draft_model, backend=backend, dtype=dtype,
            device=device, draft_length=draft_length, adaptive=adaptive, quantize=quantize, draft_quant=draft_quant,
            verify=verify, **options,
        )  # fmt: skip
        kv_bytes = opt.size("kv_cache_memory", kv_cache_memory) if kv_cache_memory is not None else default_kv_budget()
        # Clients may name the model as it was given on the command line, too.
        aliases = tuple({model, os.path.basename(os.path.normpath(model))} - {served_model_name})
        app = create_app(
            engine, model_name=served_model_name or engine.model_name, aliases=aliases, api_key=api_key,
            max_queue=max_queue, max_body_bytes=max_body_bytes, max_num_seqs=max_num_seqs,
            max_batch_tokens=max_batch_tokens, prefill_chunk=prefill_chunk, kv_cache_bytes=kv_bytes,
            reasoning_suffix=reasoning.suffix,
        )  # fmt: skip
    except (SpecDecodeError, TypeError) as e:
        fail(str(e))
    name = served_model_name or engine.model_name
    typer.secho(
        f"serving {name!r} with method {method!r} on http://{host}:{port}/v1"
        + (f" -- LOSSY verification {engine.verify.describe()}" if engine.verify.lossy else "")
        + (" (API key required)" if api_key else ""),
        err=True, fg=typer.colors.CYAN,
    )  # fmt: skip
    state = app.state.server
    if state.reasoning_suffix:
        typer.secho(f"reasoning suffix for requests that send none: {state.reasoning_suffix!r}", err=True, fg=typer.colors.CYAN)
    if state.batch_stats is not None:
        typer.secho(
            f"continuous batching: up to {state.batch_stats.max_num_seqs} requests at once, "
            f"{state.batch_stats.max_batch_tokens} tokens per step (KV cache grown by need, "
            f"budget {(kv_bytes or 0) / 2**30:.2f} GiB)",
            err=True, fg=typer.colors.CYAN,
        )  # fmt: skip
    else:
        typer.secho(f"one request at a time: {state.batching_off_reason}", err=True, fg=typer.colors.YELLOW)
    _serve(app, uvicorn.Config(app, host=host, port=port, log_level=log_level))


def default_kv_budget() -> int | None:
    """Half the memory free now (after loading): the KV caches grow by need up to it, leaving
    the rest to the process and the machine. None where the free memory cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return None


def _serve(app, config) -> None:
    """uvicorn in a thread of its own, the generation worker on this (the main) thread: see
    ``Worker.driven_by_caller`` for why. SIGINT/SIGTERM ask uvicorn to shut down gracefully; its
    shutdown stops the worker, which ends the loop here."""
    import signal
    import threading

    import uvicorn

    worker = app.state.server.worker
    worker.driven_by_caller = True
    server = uvicorn.Server(config)

    def http() -> None:
        try:
            server.run()
        finally:
            worker.stop()  # also when uvicorn could not start (a port in use): end the loop below

    def on_signal(signum, frame) -> None:
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=http, name="specdecode-http", daemon=True)
    thread.start()
    worker.run_here()
    server.should_exit = True
    thread.join(timeout=30)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
