"""Tokenizing and checking prompts on threads of their own, before a request is queued.

The worker thread runs the model, one request at a time; tokenizing there (text, or chat
messages through the template) let one huge prompt hold up every request behind it. So the
request handler tokenizes on a small pool of threads, each with its own copy of the tokenizer
(a Rust tokenizer must not be used by two threads at once, and the worker's detokenizer uses
the engine's), checks the prompt against the context and ``max_tokens``, and queues token ids
only. Rust tokenizers release the GIL while encoding, so the event loop and the worker go on
meanwhile.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
from concurrent.futures import ThreadPoolExecutor

from ..errors import InvalidArgument

log = logging.getLogger("specdecode.server")

TOKENIZER_THREADS = 2


class PromptEncoder:
    def __init__(self, engine, threads: int = TOKENIZER_THREADS):
        self.engine = engine
        self._tokenizers: queue.SimpleQueue = queue.SimpleQueue()  # one per thread: never shared
        for _ in range(threads):
            self._tokenizers.put(_copy(engine.tokenizer))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="specdecode-tokenize")
        self.pending = 0  # prompts being tokenized or waiting for a thread (event-loop side only)

    async def encode(self, prompt: str | list[dict] | list[int]) -> list[int]:
        """``engine.encode(prompt)`` on a tokenizer thread: InvalidArgument if unusable."""
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._encode, prompt)
        finally:
            self.pending -= 1

    def _encode(self, prompt) -> list[int]:
        tokenizer = self._tokenizers.get()
        try:
            return encode(self.engine, prompt, tokenizer)
        finally:
            self._tokenizers.put(tokenizer)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _copy(tokenizer):
    try:
        return copy.deepcopy(tokenizer)
    except Exception as e:  # noqa: BLE001 - a tokenizer that cannot be copied is shared (reads only)
        log.warning("cannot copy the tokenizer (%s: %s); the tokenizer threads share it", type(e).__name__, e)
        return tokenizer


def encode(engine, prompt, tokenizer=None) -> list[int]:
    """``engine.encode``, with a chat template refusing the messages (HF templates call
    ``raise_exception``, e.g. "roles must alternate") reported as a bad request."""
    try:
        if tokenizer is None:
            return engine.encode(prompt)  # InvalidArgument('prompt'/'messages') if unusable
        return engine.encode(prompt, tokenizer=tokenizer)
    except Exception as e:
        try:
            from jinja2 import TemplateError
        except ImportError:  # pragma: no cover - transformers needs jinja2 for chat templates
            raise e from None
        if isinstance(e, TemplateError):
            raise InvalidArgument("messages", f"the model's chat template rejects them: {e}") from None
        raise


def fit_max_tokens(prompt_tokens: int, context: int, max_tokens: int | None, default: int | None) -> int:
    """The new tokens to generate: ``max_tokens`` if it fits in the context after the prompt
    (InvalidArgument if not), else ``default`` or the rest of the context, whichever is less."""
    room = context - prompt_tokens
    if max_tokens is not None:
        if max_tokens > room:
            raise InvalidArgument(
                "max_tokens",
                f"the model's context holds {context} tokens; the prompt has {prompt_tokens}, "
                f"so at most {room} new tokens fit, but {max_tokens} were asked for",
            )
        return max_tokens
    return room if default is None else min(default, room)
