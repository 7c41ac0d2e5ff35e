"""A benchmark worker: one target model in memory, every method on it, and the timed loop of
one question's turns. Used in-process, or as a Ray actor (one per GPU or CPU slot).

All our methods share one target (``Engine.with_method``); the peers share one transformers
copy of it (the backend's own model when the backend is ``hf``, so then no second copy).

Fairness: every turn of every method is timed the same way, by the wall clock around the one
call that produces its tokens, with device synchronisation on both sides. The prompt is encoded
before the clock starts and the answer decoded to text after it stops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgument
from .answers import make_record, model_id
from .conversation import Conversation
from .methods import MethodSpec, OurMethod
from .peers import HFPeer, load_hf_model
from .questions import Question


@dataclass
class BenchConfig:
    """What every worker needs to build the same methods with the same settings."""

    model: str
    methods: list[MethodSpec]
    draft_model: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = 0
    dtype: str = "auto"
    device: str = "cpu"
    backend: str = "auto"
    threads: int | None = None
    warmup: int = 1

    @property
    def model_name(self) -> str:
        return Path(str(self.model)).name

    def record_config(self, spec: MethodSpec) -> dict[str, Any]:
        """The settings stored with each answer; resuming requires them to be equal."""
        options = dict(spec.options)
        if spec.needs_draft_model:
            options["draft_model"] = Path(str(self.draft_model)).name
        return {
            "model": self.model_name,
            "method": spec.name,
            "options": options,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "seed": self.seed if self.temperature > 0 else None,
            "dtype": self.dtype,
        }


class Memory:
    """Peak memory of a turn: allocated CUDA memory on a GPU; on CPU the process's resident set
    size after the turn (psutil; without it the process-wide peak from ``resource``)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        try:
            import psutil

            self._process = psutil.Process()
        except ImportError:
            self._process = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._process is not None:
            return int(self._process.memory_info().rss)
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class BenchWorker:
    def __init__(self, config: BenchConfig, progress: bool = False):
        from ..engine import Engine

        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.engine = Engine.from_pretrained(
            config.model, "vanilla", backend=config.backend, dtype=config.dtype, device=config.device, progress=progress
        )
        target = self.engine.target
        self.dtype_name = str(target.dtype).removeprefix("torch.")
        self.memory = Memory(target.device)
        self.runners: dict[str, Any] = {}
        self._hf_target = None
        for spec in config.methods:
            if spec.needs_draft_model and config.draft_model is None:
                raise InvalidArgument("draft_model", f"method {spec.name!r} needs --draft-model")
            if spec.is_peer:
                self.runners[spec.name] = self._peer(spec, progress)
            else:
                options = dict(spec.options)
                if spec.needs_draft_model:
                    options["draft_model"] = config.draft_model
                self.runners[spec.name] = OurMethod(self.engine.with_method(spec.base, progress=progress, **options))
        self.specs = {s.name: s for s in config.methods}

    def _peer(self, spec: MethodSpec, progress: bool) -> HFPeer:
        from ..hub import resolve_model

        target = self.engine.target
        if self._hf_target is None:  # one transformers copy of the target for all peers
            shared = getattr(target, "model", None)  # the hf backend already holds one
            self._hf_target = shared if shared is not None else load_hf_model(
                self.engine.model_path, target.dtype, target.device, progress
            )  # fmt: skip
        assistant = None
        if spec.base == "hf-assisted":
            draft_path = resolve_model(str(self.config.draft_model), progress=progress)
            assistant = load_hf_model(draft_path, target.dtype, target.device, progress)
        return HFPeer(
            spec.name, spec.options, self._hf_target, eos_ids=self.engine.eos_ids,
            pad_id=getattr(self.engine.tokenizer, "pad_token_id", None), max_length=target.max_length,
            assistant=assistant,
        )  # fmt: skip

    def _sync(self) -> None:
        if self.engine.target.device.type == "cuda":
            torch.cuda.synchronize(self.engine.target.device)

    def _encode(self, conversation: Conversation, turn: str, question: Question, number: int) -> list[int]:
        try:
            return self.engine.encode(conversation.ask(turn))
        except InvalidArgument as e:  # e.g. a prompt longer than the model's context
            where = f"question {question.question_id} ({question.category}), turn {number}"
            raise InvalidArgument("questions", f"{where}: {e}") from None

    def warm_up(self, question: Question) -> None:
        """Run each method on the question's first turn, untimed: first calls pay for lazy
        initialisation (allocators, kernels, caches) that would otherwise land on one method."""
        ids = self._encode(Conversation(self.engine.tokenizer), question.turns[0], question, 1)
        for _ in range(self.config.warmup):
            for runner in self.runners.values():
                runner.run_turn(ids, min(self.config.max_new_tokens, 32), self.config.temperature, self.config.seed)
        for runner in self.runners.values():  # memory across requests starts cold on the timed ones
            if isinstance(runner, OurMethod):
                runner.engine.drafter.forget()
        self._sync()

    def answer(self, question: Question, method: str) -> dict[str, Any]:
        """Ask ``question`` turn by turn with ``method``; the answer record."""
        runner, cfg = self.runners[method], self.config
        conversation = Conversation(self.engine.tokenizer)
        turns = []
        for number, turn in enumerate(question.turns, 1):
            ids = self._encode(conversation, turn, question, number)
            self._sync()
            self.memory.start()
            start = time.perf_counter()
            out = runner.run_turn(ids, cfg.max_new_tokens, cfg.temperature, cfg.seed)
            self._sync()
            wall = time.perf_counter() - start
            # Spec-Bench strips its answers; the next turn sees the answer as recorded.
            text = self.engine.tokenizer.decode(out.token_ids, skip_special_tokens=True).strip()
            conversation.answer(text)
            turns.append({
                "text": text, "decoding_steps": out.decoding_steps, "new_tokens": len(out.token_ids),
                "wall_time": wall, "accept_lengths": out.accept_lengths, "token_ids": out.token_ids,
                "drafted_tokens": out.drafted_tokens, "accepted_draft_tokens": out.accepted_draft_tokens,
                "peak_memory": self.memory.peak(),
            })  # fmt: skip
        spec = self.specs[method]
        name = model_id(cfg.model_name, method, self.dtype_name, cfg.temperature)
        return make_record(question, method, name, cfg.record_config(spec), turns)

    def answer_all(self, question: Question, methods: list[str]) -> list[dict[str, Any]]:
        """Every listed method on one question, in the given order (one Ray call per question)."""
        return [self.answer(question, m) for m in methods]

    def info(self) -> dict[str, Any]:
        return {"device": str(self.engine.target.device), "dtype": self.dtype_name, "threads": torch.get_num_threads()}
