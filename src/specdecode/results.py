"""What a generation gives back: its statistics (folded from the decoding loop's records), its
result, and the stream of its text pieces."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .decoding import Prefill, Step


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # verification forwards (decoding steps), prefill excluded
    accept_lengths: list[int] = field(default_factory=list)  # tokens emitted per step
    drafted_tokens: int = 0  # proposed by the drafter
    verified_draft_tokens: int = 0  # of those, sent to verification (the sizing's cut)
    accepted_draft_tokens: int = 0
    plain_steps: int = 0  # steps that verified no draft (one token, as plain decoding)
    prefill_time: float = 0.0
    first_token_time: float = 0.0  # from the start until the first decoding step's tokens
    draft_time: float = 0.0
    verify_time: float = 0.0
    total_time: float = 0.0
    method: dict[str, Any] = field(default_factory=dict)
    verify: str = "exact"  # the acceptance rule; anything else is lossy when ``lossy`` says so
    lossy: bool = False

    def add(self, record: Prefill | Step) -> None:
        """Fold one record of the decoding loop into the totals (a batched request's prompt
        may be prefilled in several chunks: their times add up)."""
        if isinstance(record, Prefill):
            self.prefill_time += record.seconds
            return
        self.target_forwards += 1
        self.accept_lengths.append(len(record.tokens))
        self.drafted_tokens += record.drafted
        self.verified_draft_tokens += record.verified
        self.accepted_draft_tokens += record.accepted
        self.plain_steps += record.plain
        self.draft_time += record.draft_time
        self.verify_time += record.verify_time

    @property
    def mean_accepted_tokens(self) -> float:
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / verified draft tokens."""
        return self.accepted_draft_tokens / self.verified_draft_tokens if self.verified_draft_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_time if self.total_time > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first step per second after it: decoding speed, prompt excluded
        (as llama.cpp reports it)."""
        rest = self.new_tokens - (self.accept_lengths[0] if self.accept_lengths else 0)
        seconds = self.total_time - self.first_token_time
        return rest / seconds if rest > 0 and seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            mean_accepted_tokens=self.mean_accepted_tokens,
            acceptance_rate=self.acceptance_rate,
            tokens_per_second=self.tokens_per_second,
            decode_tokens_per_second=self.decode_tokens_per_second,
        )
        return d


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # the new tokens (an EOS that ended generation included)
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: GenerationStats

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": len(self.prompt_token_ids),
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


class GenerationStream:
    """Iterates over text pieces as they are decoded; ``result`` is set once they are exhausted.

    ``generation`` yields the pieces and returns the result (``Engine._generation``)."""

    def __init__(self, generation: Generator[str, None, GenerationResult]):
        self._generation = generation
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._generation)
        except StopIteration as end:
            if end.value is not None:  # the first time only: then the generation is over
                self.result = end.value
            raise

    def close(self) -> None:
        self._generation.close()
