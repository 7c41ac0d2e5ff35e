"""Does drafting pay on this machine? Measure it, and decode plainly when it does not.

Speculation helps only when a draft token costs less than the chance it is accepted times one
target forward. A self-drafting model that skips layers is not always cheap enough for that: on
a memory-bound CPU a draft forward of a 1.5B model with 45% of its sub-layers skipped still
reads ~60% of the weights, while its first token is accepted ~40% of the time; drafting then
makes decoding slower than plain decoding. Which side of the line a model falls on depends on
the model, the text and the hardware, so it is measured, not assumed.

Two arms, each with the tokens it emitted and the seconds it took over its recent steps:
drafting steps (draft + verification) and plain steps (an empty draft: one target forward, one
token, exactly vanilla decoding). The faster arm is used; the other is retried every
``probe_interval`` steps so that a change (easier text, a better skip set) is noticed. Both arms
are lossless, so the choice changes the speed only, never the output.
"""

from __future__ import annotations

import statistics
from collections import deque


class _Arm:
    """An arm's recent steps. Its rate is tokens / seconds over the last ``window`` steps,
    leaving out steps that took more than ``OUTLIER`` times the median step: one slow step (a
    kernel's first call, a hiccup of a shared machine) must not decide for dozens of steps."""

    OUTLIER = 4.0

    def __init__(self, window: int = 16) -> None:
        self.steps: deque[tuple[int, float]] = deque(maxlen=window)
        self.samples = 0

    def add(self, tokens: int, seconds: float) -> None:
        self.steps.append((tokens, seconds))
        self.samples += 1

    @property
    def rate(self) -> float:
        if not self.steps:
            return float("inf")
        limit = self.OUTLIER * statistics.median(s for _, s in self.steps)
        kept = [(t, s) for t, s in self.steps if s <= limit]
        seconds = sum(s for _, s in kept)
        return sum(t for t, _ in kept) / seconds if seconds > 0 else float("inf")


class DraftingPayoff:
    """Chooses, step by step, between drafting and plain decoding by measured tokens/second."""

    def __init__(self, *, window: int = 16, probe_interval: int = 16, min_samples: int = 4):
        self.window = window
        self.probe_interval = probe_interval
        self.min_samples = min_samples
        self.drafting = _Arm(window)
        self.plain = _Arm(window)
        self.step = 0
        self.plain_steps = 0  # steps decoded plainly (for statistics)

    def should_draft(self) -> bool:
        self.step += 1
        if self.drafting.samples < self.min_samples:
            return True  # drafting is the method: give it a fair trial first
        if self.plain.samples < self.min_samples:
            return False
        faster = self.drafting.rate >= self.plain.rate
        if self.step % self.probe_interval == 0:
            return not faster  # look at the other arm now and then
        return faster

    def record(self, drafted: bool, tokens: int, seconds: float) -> None:
        """A step's outcome: ``tokens`` emitted in ``seconds`` (drafting and verification)."""
        if drafted:
            self.drafting.add(tokens, seconds)
        else:
            self.plain.add(tokens, seconds)
            self.plain_steps += 1

    def forget_drafting(self) -> None:
        """The draft changed (a new skip set): its old measurements no longer apply."""
        self.drafting = _Arm(self.window)
