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

from ..errors import InvalidArgument, SpecDecodeError
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
    quantize: str | None = None  # the target served quantized (int4, int4-gN, int8): our methods only
    draft_quant: str | None = None  # the sps draft model quantized

    @property
    def model_name(self) -> str:
        return Path(str(self.model)).name

    def record_config(self, spec: MethodSpec) -> dict[str, Any]:
        """The settings stored with each answer; resuming requires them to be equal."""
        options = dict(spec.options)
        if spec.needs_draft_model:
            options["draft_model"] = Path(str(self.draft_model)).name
            if self.draft_quant and not spec.is_peer:
                options["draft_quant"] = self.draft_quant
        quantized = {"quantize": self.quantize} if self.quantize and not spec.is_peer else {}
        return {
            "model": self.model_name,
            "method": spec.name,
            "options": options,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "seed": self.seed if self.temperature > 0 else None,
            "dtype": self.dtype,
            **quantized,
        }


class QuestionSkipped(SpecDecodeError):
    """A question that cannot be asked of this model (a prompt longer than its context)."""

    def __init__(self, question: Question, reason: str):
        super().__init__(f"question {question.question_id} ({question.category}): {reason}")
        self.question_id, self.category, self.reason = question.question_id, question.category, reason

    def __reduce__(self):  # picklable, so it crosses Ray's process boundary
        return (_skipped, (self.question_id, self.category, self.reason))

    def record(self) -> dict[str, Any]:
        return {"skipped": True, "question_id": self.question_id, "category": self.category, "reason": self.reason}


def _skipped(question_id: int, category: str, reason: str) -> QuestionSkipped:
    return QuestionSkipped(Question(question_id, category, ("?",)), reason)


class Memory:
    """Peak memory of a turn: allocated CUDA memory's peak on a GPU; on Linux CPUs the process's
    peak resident set size during the turn (the kernel's high-water mark, reset at the turn's
    start through /proc/self/clear_refs); elsewhere the process's peak since it started
    (``resource``), which never goes down."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.per_turn = self.cuda or self._reset_hwm()

    @classmethod
    def _reset_hwm(cls) -> bool:
        """Reset the kernel's peak-RSS mark, and say whether that really works here: some
        kernels and sandboxes accept the write and keep the old peak, so a 96 MiB spike is
        touched, freed, and the mark must come down after the reset. (A long-lived process may
        serve the spike from freed, still-resident heap, so the probe can fail where the reset
        works: then the bench falls back to the process peak, which is safe, never wrong.)"""
        if not cls._write_reset():
            return False
        spike = torch.ones(96 << 20, dtype=torch.uint8)  # touched: resident
        del spike
        before = cls._status_bytes("VmHWM:")
        if not cls._write_reset():
            return False
        after = cls._status_bytes("VmHWM:")
        return before is not None and after is not None and before - after > 48 << 20

    @staticmethod
    def _write_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5": reset the peak RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    @staticmethod
    def _status_bytes(field: str) -> int | None:
        try:
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024  # kB
        except OSError:
            pass
        return None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.per_turn:
            self._write_reset()

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.per_turn:
            hwm = self._status_bytes("VmHWM:")
            if hwm is not None:
                return hwm
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class BenchWorker:
    def __init__(self, config: BenchConfig, progress: bool = False):
        from ..engine import Engine

        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.engine = Engine.from_pretrained(
            config.model, "vanilla", backend=config.backend, dtype=config.dtype, device=config.device, progress=progress,
            quantize=config.quantize,
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
                    options["draft_quant"] = config.draft_quant
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
        except InvalidArgument as e:
            if e.argument == "prompt" and "context holds" in e.message:  # longer than the model's context
                raise QuestionSkipped(question, f"turn {number}: {e.message}") from None
            where = f"question {question.question_id} ({question.category}), turn {number}"
            raise InvalidArgument("questions", f"{where}: {e}") from None

    def warm_up(self, questions: list[Question]) -> None:
        """Run each method on a question's first turn, untimed: first calls pay for lazy
        initialisation (allocators, kernels, caches) that would otherwise land on one method.
        The first question that fits the model's context is used."""
        for question in questions:
            try:
                ids = self._encode(Conversation(self.engine.tokenizer), question.turns[0], question, 1)
                break
            except QuestionSkipped:
                continue
        else:
            return
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
                "first_token_time": out.first_token_seconds, "verified_draft_tokens": out.verified_draft_tokens,
                "peak_memory": self.memory.peak(), "drafter_bytes": out.drafter_bytes,
            })  # fmt: skip
        spec = self.specs[method]
        name = model_id(cfg.model_name, method, self.dtype_name, cfg.temperature)
        return make_record(question, method, name, cfg.record_config(spec), turns)

    def answer_all(self, question: Question, methods: list[str]) -> list[dict[str, Any]]:
        """Every listed method on one question, in the given order (one Ray call per question);
        a skipped question gives one record saying why."""
        try:
            return [self.answer(question, m) for m in methods]
        except QuestionSkipped as e:
            return [{**e.record(), "methods": len(methods)}]

    def info(self) -> dict[str, Any]:
        """Where the run ran: device, dtype, threads, the CPU, and the target's forward cost
        curve on it (measured once per machine and cached; what payoff sizing plans with)."""
        from ..backends.invariance import cpu_model
        from ..costmodel import CostModel

        cost = CostModel.for_target(self.engine.target, progress=False)
        return {
            "device": str(self.engine.target.device), "dtype": self.dtype_name, "threads": torch.get_num_threads(),
            "cpu": cpu_model(), "cost_curve": cost.describe(128), "cost_curve_long": cost.describe(512),
        }  # fmt: skip
