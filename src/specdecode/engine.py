"""The engine: a target model, its tokenizer and a drafter, joined by the decoding loop.

Where the parts live: the loop (propose -> verify in one target forward -> accept -> roll back)
in ``decoding.py``; text and stop strings in ``text.py``; statistics and results in
``results.py``; loading in ``loading.py``; the methods and their needs in
``drafters/registry.py``; the draft-length policy in ``sizing.py``. This module builds engines
and runs requests through them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .backends import Backend
from .backends.quant import QuantConfig
from .decoding import Request, Step, decode
from .drafters import Drafter, VanillaDrafter, registry
from . import checks
from .errors import InvalidArgument
from .loading import eos_token_ids, load_draft_model, load_target
from .results import GenerationResult, GenerationStats, GenerationStream
from .sampling import SamplingParams
from .sizing import engine_sizings
from .text import OutputText
from .verification import VerifyRule

# Names that lived here before, still importable from here.
from .drafters.registry import method_components
from .loading import DTYPES, check_same_tokenizer, load_tokenizer, parse_dtype

__all__ = [
    "DTYPES", "Engine", "GenerationResult", "GenerationStats", "GenerationStream", "check_same_tokenizer",
    "load_tokenizer", "method_components", "parse_dtype",
]  # fmt: skip


# Choices among methods rather than methods (``auto``): name -> a builder of the engine that
# chooses, ``builder(engine, draft_model=, sizing=, progress=, draft_quant=, verify=, **options)``.
# Registered by their own modules (auto.py), which build on this one: no import back.
CHOOSERS: dict[str, Callable[..., "Engine"]] = {}


def _check_method(method: str, draft_model) -> None:
    if method not in CHOOSERS:  # auto's arms are checked when they are built
        registry.check_draft_model(method, draft_model)


class Engine:
    def __init__(
        self,
        target: Backend,
        tokenizer,
        drafter: Drafter,
        *,
        draft_length: int | None = None,
        adaptive: bool | None = None,
        sizing: str | None = None,
        max_draft_length: int = 16,
        model_name: str = "model",
        eos_ids: set[int] | None = None,
        verify: VerifyRule | None = None,
    ):
        self.target = target
        self.verify = verify or VerifyRule()
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.model_name = model_name
        self.method = drafter.name
        self.model_path: Path | None = getattr(tokenizer, "name_or_path", None) and Path(tokenizer.name_or_path)
        self.backend_name = target.name
        self.sizing, self.seeded_sizing = engine_sizings(
            drafter, target, draft_length=draft_length, adaptive=adaptive, sizing=sizing, max_draft_length=max_draft_length
        )
        self.eos_ids = eos_token_ids(tokenizer, target) if eos_ids is None else set(eos_ids)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        method: str = "vanilla",
        *,
        draft_model: str | Path | None = None,
        backend: str = "auto",
        dtype: str | torch.dtype | None = "auto",
        device: str = "cpu",
        draft_length: int | None = None,
        adaptive: bool | None = None,
        sizing: str | None = None,
        max_length: int | None = None,
        progress: bool = True,
        quantize: str | QuantConfig | None = None,
        draft_quant: str | QuantConfig | None = None,
        verify: str = "exact",
        **method_options: Any,
    ) -> "Engine":
        """Load a target (folder or known short name) and the drafter for ``method``.

        method_options go to the drafter (pld: max_ngram, min_ngram). ``quantize`` ("int4",
        "int4-g128", "int8"): serve the target itself with weight-only quantized linears; every
        method is then exact against that quantized model. ``draft_quant``: the same for the sps
        draft model. ``verify="specdec"`` (with beta, tau among the options) is SpecDec's lossy
        acceptance rule (see verification.py).
        """
        _check_method(method, draft_model)
        path, tokenizer, target = load_target(
            model, backend=backend, dtype=dtype, device=device, max_length=max_length, quantize=quantize, progress=progress
        )
        engine = cls(target, tokenizer, VanillaDrafter(), model_name=Path(str(model)).name)
        engine.model_path, engine.backend_name = path, backend
        return engine.with_method(
            method, draft_model=draft_model, draft_length=draft_length, adaptive=adaptive, sizing=sizing,
            progress=progress, draft_quant=draft_quant, verify=verify, **method_options,
        )  # fmt: skip

    def with_method(
        self,
        method: str,
        *,
        draft_model: str | Path | None = None,
        draft_length: int | None = None,
        adaptive: bool | None = None,
        sizing: str | None = None,
        progress: bool = True,
        draft_quant: str | QuantConfig | None = None,
        verify: str = "exact",
        _shared: dict[str, Drafter] | None = None,
        **method_options: Any,
    ) -> "Engine":
        """A new engine for ``method`` that shares this one's target model (no second copy of
        the weights). Engines sharing a target must not generate at the same time.
        ``draft_quant`` ("int4", "int4-g128", "int8"): the sps draft model's linears quantized."""
        _check_method(method, draft_model)
        if method in CHOOSERS:
            return CHOOSERS[method](self, draft_model=draft_model, sizing=sizing, progress=progress,
                                    draft_quant=draft_quant, verify=verify, **method_options)  # fmt: skip
        spec = registry.parse(method, method_options, verify)
        registry.check_draft_quant(method, draft_quant)

        def draft_model_loader():
            return load_draft_model(
                draft_model, target=self.target, tokenizer=self.tokenizer, target_path=self.model_path,
                backend=self.backend_name, draft_quant=draft_quant, progress=progress,
            )  # fmt: skip

        context = registry.BuildContext(self.target, self.tokenizer, draft_model_loader, self.model_name)
        drafter = registry.build(spec, context, _shared)  # auto's arms share drafters (one quantized copy)
        rule = spec.rule
        engine = Engine(
            self.target, self.tokenizer, drafter, draft_length=draft_length, adaptive=adaptive, sizing=sizing,
            model_name=self.model_name, eos_ids=self.eos_ids, verify=rule,
        )  # fmt: skip
        engine.model_path, engine.backend_name = self.model_path, self.backend_name
        return engine

    @property
    def lossy(self) -> bool:
        """Whether outputs may differ from the target's own: a lossy acceptance rule (SpecDec's,
        opt-in) or a drafting method the registry does not declare lossless."""
        return self.verify.lossy or not self.drafter.lossless

    # ---- input --------------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict] | list[int], *, tokenizer=None) -> list[int]:
        """Prompt text, chat messages (through the chat template) or token ids -> token ids.
        ``tokenizer``: a copy of the engine's to use instead (the server tokenizes on threads
        of its own, each with its own copy)."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgument("prompt", "expected a non-empty string")
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            for i, m in enumerate(prompt):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise InvalidArgument("messages", f"message {i} needs string 'role' and 'content'")
            if not getattr(tokenizer, "chat_template", None):
                raise InvalidArgument("messages", f"model {self.model_name!r} has no chat template; pass a plain prompt")
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
            bad = [t for t in ids if not 0 <= t < self.target.vocab_size]
            if bad:
                raise InvalidArgument("prompt", f"token id {bad[0]} is outside the vocabulary [0, {self.target.vocab_size})")
        else:
            raise InvalidArgument("prompt", "expected a non-empty string, a list of chat messages or a list of token ids")
        ids = [int(t) for t in ids]
        if not ids:
            raise InvalidArgument("prompt", "it encodes to no tokens")
        if len(ids) >= self.target.max_length:
            raise InvalidArgument(
                "prompt", f"it has {len(ids)} tokens; the model's context holds {self.target.max_length} in all"
            )
        return ids

    # ---- decoding ----------------------------------------------------------------------------
    def _sizing_for(self, params: SamplingParams):
        """Seeded sampling must repeat itself, so its drafts cannot depend on timings."""
        return self.seeded_sizing if params.seed is not None and not params.greedy else self.sizing

    def _generation(
        self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams, stop: list[str]
    ) -> Generator[str, None, GenerationResult]:
        """Text pieces as the loop's steps arrive (stop strings applied); returns the result,
        its statistics folded from the loop's records."""
        sizing = self._sizing_for(params)
        stats = GenerationStats(prompt_tokens=len(prompt_ids), verify=self.verify.describe(), lossy=self.lossy)
        out = OutputText(self.tokenizer, stop, self.eos_ids)
        t0 = time.perf_counter()
        request = Request(list(prompt_ids), params, max_new_tokens, self.drafter, sizing, self.eos_ids)
        for record in decode(self.target, request, self.verify):
            piece = ""
            if isinstance(record, Step):
                if not stats.first_token_time:
                    stats.first_token_time = time.perf_counter() - t0
                kept, piece = out.add(list(record.tokens))
                if len(kept) < len(record.tokens):  # the tokens after a stop string were never output
                    record = replace(record, tokens=tuple(kept))
            stats.add(record)
            if piece:
                yield piece
            if out.stopped:
                break
        tail = out.close()
        if tail:
            yield tail
        stats.new_tokens = len(out.ids)
        stats.total_time = time.perf_counter() - t0
        stats.method = {**self.drafter.stats(), **sizing.stats()}
        return GenerationResult(out.text, out.ids, list(prompt_ids), out.finish_reason, stats)

    def prepare(self, prompt, max_new_tokens, temperature, top_p, top_k, seed, stop) -> tuple[list[int], SamplingParams, list[str]]:
        """A request's arguments checked once: (prompt ids, sampling parameters, stop strings).
        InvalidArgument names the argument at fault."""
        checks.integer("max_new_tokens", max_new_tokens)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        if self.verify.lossy and not params.greedy:
            raise InvalidArgument("temperature", f"verify={self.verify.describe()} is a greedy acceptance rule; use temperature 0")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidArgument("stop", f"expected a non-empty string or a list of them, got {stop!r}")
        return self.encode(prompt), params, list(stop)

    def stream(
        self,
        prompt: str | list[dict] | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> GenerationStream:
        """Like ``generate`` but yields text pieces; the result is on ``.result`` at the end.

        Arguments are checked now, before the first piece is asked for.
        """
        ids, params, stops = self.prepare(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop)
        return GenerationStream(self._generation(ids, max_new_tokens, params, stops))

    def generate(
        self,
        prompt: str | list[dict] | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> GenerationResult:
        """Generate a continuation of ``prompt`` (text, chat messages, or token ids)."""
        s = self.stream(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop)
        for _ in s:
            pass
        assert s.result is not None
        return s.result

    # ---- batched generation (batching.py) ----------------------------------------------------
    def batch(self, limits=None, **settings):
        """A continuous-batching scheduler over this engine's target and method (native backend):
        ``submit(prompt, ...)`` -> handle, ``step()``, ``cancel(handle)``. ``limits``: a
        ``batching.BatchLimits``, or its fields as keywords (``max_num_seqs=8``,
        ``max_batch_tokens``, ``prefill_chunk``, ``kv_cache_bytes``). Each request's output is
        what ``generate`` gives it alone (see batching.py)."""
        from .batching import BatchScheduler

        return BatchScheduler(self, limits, **settings)

    def generate_batch(
        self,
        prompts: list,
        max_new_tokens: int | list[int] = 128,
        temperature: float | list[float] = 0.0,
        top_p: float | list[float] = 1.0,
        top_k: int | list[int] = 0,
        seed: int | None | list[int | None] = None,
        stop: str | list[str] | list[list[str] | None] | None = None,
        *,
        max_num_seqs: int = 8,
        max_batch_tokens: int | None = None,
        prefill_chunk: int | None = None,
    ) -> list[GenerationResult]:
        """Generate continuations of several prompts together (continuous batching); one result
        per prompt, in order, each with its own statistics. Each setting is one value for all or
        a list with one per prompt (``stop``: a list of per-prompt lists)."""
        from .batching import generate_batch

        return generate_batch(
            self, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop=stop, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
            prefill_chunk=prefill_chunk,
        )  # fmt: skip
