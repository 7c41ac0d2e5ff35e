"""How much to draft and how much of a draft to verify: by expected payoff, or by a fixed rule.

The payoff policy (the default) chooses, each step:
1. a budget: how many tokens to ask the drafter for, the k that maximizes expected tokens per
   second, (1 + a_1 + a_1 a_2 + ... ) / (k * draft_cost + T(k + 1)), from the method's running
   acceptance per depth, its measured drafting cost per token and the target's cost curve T
   (``costmodel.py``); zero (a plain step) when no draft is worth its cost;
2. a cut: of the nodes proposed, the first k that maximize (1 + sum of their path acceptance
   probabilities) / T(k + 1) (drafting is then already paid). A node's acceptance probability
   comes from the drafter's own confidence where it gives one (a model's probability of its
   token), calibrated by what was accepted at that confidence so far; otherwise from the
   method's running acceptance at that depth.
A guard keeps it honest: drafting steps and plain steps are timed (``drafters/payoff.py``), and
while drafting measures slower than plain decoding, steps are plain except for a probe now and
then. Every choice depends only on the past (timings, earlier verdicts) and on the draft itself,
never on the target's verdict on it, so the output is exactly plain decoding's, greedy or
sampled.
"""

from __future__ import annotations

import os
import statistics
from collections import deque
from dataclasses import dataclass

from .costmodel import CostModel
from .draft import Draft
from .drafters.base import VanillaDrafter
from .drafters.payoff import DraftingPayoff
from .errors import InvalidArgument
from .checks import integer

SIZINGS = ("payoff", "adaptive", "fixed")
PROBE_INTERVAL = 16  # every this many steps, a draft is tried even where it seems not to pay
PROBE_PHASE = PROBE_INTERVAL // 2  # half-way between the guard's probes (see _probing)
DRAFT_COST_WINDOW = 16  # a drafter's cost per token: the median of its last this many steps


@dataclass
class StepRecord:
    """What one decoding step did, for the policy to learn from."""

    context: int  # cached tokens before the verification forward
    proposed: Draft  # what the drafter proposed (after the budget)
    verified: Draft  # what was verified (after the cut)
    accepted: list[int]  # accepted node indices of ``verified``, along the path
    emitted: int  # tokens the step emitted
    draft_seconds: float
    verify_seconds: float


class FixedSizing:
    """Draft ``initial`` tokens; ``adaptive``: grow by 2 after a fully accepted draft, shrink by
    1 otherwise, within [1, maximum]. Verify all of it."""

    def __init__(self, initial: int, adaptive: bool = False, maximum: int = 16):
        integer("draft_length", initial, 0)
        self.initial, self.adaptive, self.maximum = initial, adaptive, max(maximum, initial)
        self.current = initial
        self.name = "adaptive" if adaptive else "fixed"

    def begin(self) -> None:
        """Before a request's prefill."""
        self.current = self.initial

    def budget(self, context: int) -> int:
        return self.current

    def cut(self, draft: Draft, context: int) -> Draft:
        return draft

    def record(self, step: StepRecord) -> None:
        proposed, accepted = len(step.verified), len(step.accepted)
        if not self.adaptive or proposed == 0:
            return
        if accepted == proposed:
            self.current = min(self.current + 2, self.maximum)
        else:
            self.current = max(self.current - 1, 1)

    def stats(self) -> dict:
        return {"sizing": self.name}


class AcceptanceModel:
    """P(node accepted | its parent accepted), learned from verdicts.

    Keys: a drafter's confidence in tenths, or (without one) the node's depth. Counts decay, so
    the estimate follows the text; a prior of weight ``prior`` pulls a new key toward the
    confidence itself (or toward 1/2 for a depth)."""

    def __init__(self, decay: float = 0.98, prior: float = 2.0):
        self.decay, self.prior = decay, prior
        self.counts: dict[tuple, list[float]] = {}

    @staticmethod
    def _key(confidence: float | None, depth: int) -> tuple:
        if confidence is None:
            return ("depth", min(depth, 12))
        return ("conf", min(int(confidence * 10), 9))

    def estimate(self, confidence: float | None, depth: int) -> float:
        key = self._key(confidence, depth)
        mean = 0.5 if confidence is None else min(max(confidence, 0.0), 1.0)
        acc, n = self.counts.get(key, (0.0, 0.0))
        return (acc + self.prior * mean) / (n + self.prior)

    def learn(self, confidence: float | None, depth: int, accepted: bool) -> None:
        # The depth's running rate learns from every verdict, with or without a confidence:
        # the budget is chosen from it before any draft (and its confidences) exists.
        keys = {self._key(None, depth), self._key(confidence, depth)}
        for key in keys:
            c = self.counts.setdefault(key, [0.0, 0.0])
            c[0] = c[0] * self.decay + accepted
            c[1] = c[1] * self.decay + 1

    def learn_verdict(self, draft: Draft, path: list[int]) -> None:
        """A step's verdict: every node whose parent was accepted was tested; those on the
        accepted ``path`` passed."""
        reached, on_path, depths = {-1} | set(path), set(path), draft.depths()
        for i, parent in enumerate(draft.parents):
            if parent in reached:
                self.learn(draft.confidence[i] if draft.confidence else None, depths[i], i in on_path)

    def path_probabilities(self, draft: Draft) -> list[float]:
        """Each node's probability of being accepted with all its ancestors."""
        depths = draft.depths()
        probs: list[float] = []
        for i, p in enumerate(draft.parents):
            conf = draft.confidence[i] if draft.confidence else None
            probs.append(self.estimate(conf, depths[i]) * (probs[p] if p >= 0 else 1.0))
        return probs

    def depth_rates(self, depths: int) -> list[float]:
        """Running acceptance at depths 1..``depths`` (for the budget, before any draft exists)."""
        return [self.estimate(None, d) for d in range(1, depths + 1)]


class PayoffSizing:
    def __init__(self, cost: CostModel | None = None, *, maximum: int = 16, probe_draft: int = 4,
                 cost_factory=None):  # fmt: skip
        integer("max_draft_length", maximum)
        self._cost = cost
        self._cost_factory = cost_factory  # measured on first use (vanilla never needs it)
        self.maximum = maximum
        self.probe_draft = min(probe_draft, maximum)
        self.acceptance = AcceptanceModel()
        self.guard: DraftingPayoff | None = DraftingPayoff()  # None: trust the cost model alone
        self._draft_costs: deque[float] = deque(maxlen=DRAFT_COST_WINDOW)  # seconds per proposed token
        self._draft_cost: float | None = None  # set by hand (tests); else the median above
        self.steps = 0
        self.plain_steps = 0
        self.name = "payoff"

    @property
    def draft_cost(self) -> float:
        """Seconds per proposed token: the median of the recent drafting steps, so that one slow
        step (a first call's warm-up, a hiccup of the machine) cannot keep a drafter off."""
        if self._draft_cost is not None:
            return self._draft_cost
        return statistics.median(self._draft_costs) if self._draft_costs else 0.0

    @draft_cost.setter
    def draft_cost(self, seconds: float) -> None:
        self._draft_cost = seconds

    @property
    def _draft_samples(self) -> int:
        """Drafting steps the cost is known from (a cost set by hand counts as one)."""
        return len(self._draft_costs) + (self._draft_cost is not None)

    @property
    def cost(self) -> CostModel:
        if self._cost is None:
            self._cost = self._cost_factory()
        return self._cost

    def begin(self) -> None:
        """Before a request's prefill: the cost curve is measured now if it must be (measuring
        runs forwards on the target's cache); what was learned carries over between requests."""
        _ = self.cost

    # ---- the two choices ----------------------------------------------------------------------
    def budget(self, context: int) -> int:
        self.steps += 1
        if self.guard is not None and not self.guard.should_draft():
            return 0
        rates = self.acceptance.depth_rates(self.maximum)
        t1 = self.cost.forward(1, context)
        best_k, best = 0, 1.0 / t1
        expected, path = 1.0, 1.0
        for k in range(1, self.maximum + 1):
            path *= rates[k - 1]
            expected += path
            rate = expected / (k * self.draft_cost + self.cost.forward(k + 1, context))
            if rate > best:
                best_k, best = k, rate
        if self._draft_samples and self.draft_cost < 0.02 * t1:
            # A free drafter (lookup): let it propose all it has; the cut below decides on its
            # actual draft and, where it gives them, its confidences.
            return self.maximum
        if best_k == 0 and (self._probing() or not self._draft_samples):
            return self.probe_draft  # keep learning (the text may have changed), or start to
        return best_k

    def _probing(self) -> bool:
        # Off the guard's probe steps: when the guard has measured drafting as the faster arm,
        # its probes are plain steps, and a sizing probe there would never draft, so a budget
        # stuck at zero (pessimistic estimates) would never be corrected.
        return self.steps > 0 and self.steps % PROBE_INTERVAL == PROBE_PHASE

    def path_probabilities(self, draft: Draft) -> list[float]:
        return self.acceptance.path_probabilities(draft)

    def cut(self, draft: Draft, context: int) -> Draft:
        if not len(draft):
            return draft
        probs = self.path_probabilities(draft)
        best_k, best = 0, 1.0 / self.cost.forward(1, context)
        expected = 1.0
        for k in range(1, len(draft) + 1):
            expected += probs[k - 1]
            rate = expected / self.cost.forward(k + 1, context)
            if rate > best:
                best_k, best = k, rate
        if self._probing():
            best_k = max(best_k, min(len(draft), self.probe_draft))
        return draft.head(best_k)

    # ---- learning -----------------------------------------------------------------------------
    def record(self, step: StepRecord) -> None:
        self.cost.observe(len(step.verified) + 1, step.context, step.verify_seconds)
        if len(step.proposed):
            self._draft_costs.append(step.draft_seconds / len(step.proposed))
        drafted = len(step.proposed) > 0
        if not drafted:
            self.plain_steps += 1
        if self.guard is not None:
            self.guard.record(drafted, step.emitted, step.draft_seconds + step.verify_seconds)
        self.acceptance.learn_verdict(step.verified, step.accepted)

    def stats(self) -> dict:
        return {"sizing": self.name, "plain_steps_total": self.plain_steps,
                "draft_cost_ms": round(self.draft_cost * 1e3, 3)}  # fmt: skip


def make_sizing(name: str | None, initial: int, maximum: int, cost_factory) -> FixedSizing | PayoffSizing:
    if name is None:
        name = "payoff"
    if name not in SIZINGS:
        raise InvalidArgument("sizing", f"expected one of {', '.join(SIZINGS)}, got {name!r}")
    if name == "payoff":
        return PayoffSizing(maximum=maximum, probe_draft=max(1, initial), cost_factory=cost_factory)
    return FixedSizing(initial, adaptive=name == "adaptive", maximum=maximum)


def engine_sizings(drafter, target, *, draft_length: int | None, adaptive: bool | None, sizing: str | None,
                   max_draft_length: int = 16) -> tuple[FixedSizing | PayoffSizing, FixedSizing]:  # fmt: skip
    """An engine's draft-length policies: the one it runs, and the one for seeded sampling.

    ``sizing`` names the policy; else ``adaptive`` (--adaptive / --fixed) chooses; else a
    ``draft_length`` asked for is a length kept (fixed); else $SPECDECODE_SIZING (a
    deployment's, or a test module's, default); else payoff. Plain decoding has nothing to size.
    """
    k = drafter.default_draft_length if draft_length is None else draft_length
    if sizing is None and adaptive is not None:
        sizing = "adaptive" if adaptive else "fixed"
    if sizing is None and draft_length is not None:
        sizing = "fixed"
    if sizing is None:
        sizing = os.environ.get("SPECDECODE_SIZING") or None
    if isinstance(drafter, VanillaDrafter):
        sizing = "fixed"
    chosen = make_sizing(sizing, k, max(max_draft_length, k), lambda: CostModel.for_target(target))
    # Seeded sampling must repeat itself, so its drafts cannot depend on timings: such a
    # request sizes its drafts by the (deterministic) grow/shrink rule instead.
    seeded = chosen if isinstance(chosen, FixedSizing) else FixedSizing(k, adaptive=True)
    return chosen, seeded
