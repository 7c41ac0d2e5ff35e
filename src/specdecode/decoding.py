"""One decoding step for one request, and the loop that runs it for a lone request.

A step: the request's drafter proposes (within what the draft-length policy and the room left
allow) -> one target forward verifies the root token and the draft -> the acceptance rule keeps
a path -> the cache keeps the path's rows -> the drafter observes the logits and learns the
verdict. The forward is the caller's: ``decode`` below runs one per step for a lone request on
the target's own cache; the batch scheduler (``batching.py``) runs one for many requests at
once. Everything else in a step is here, in ``Request.plan`` and ``Request.settle``, so the
lossless guarantee is read in one place:

* greedy keeps the longest draft path equal to the target's argmax, plus the target's own next
  token (``VerifyRule``, which may be SpecDec's opt-in lossy rule);
* sampling uses lossless speculative sampling (``draft.verify_sampling``) with the request's own
  generator.

Invariant: the target's KV cache holds every token of the sequence but the last; that last token
is the root of the next draft and the first token of the next verification forward.

Nothing here owns statistics: a step returns an immutable ``Step`` record (a ``Prefill`` for the
prompt) and whoever drives it folds them (``GenerationStats.add``). ``sizing.StepRecord`` is the
draft-length policy's own, richer view of a step (the drafts themselves), fed to it here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .backends import Backend
from .draft import Draft
from .drafters import Drafter
from .sampling import SamplingParams, make_generator
from .sizing import AcceptanceModel, StepRecord
from .verification import VerifyRule


@dataclass(frozen=True)
class Prefill:
    """The prompt (all of it but its last token) went into the cache in ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class Step:
    """One verification forward and what it emitted."""

    tokens: tuple[int, ...]  # emitted: the accepted draft tokens and the target's own (EOS included, nothing after)
    drafted: int  # tokens the drafter proposed (within the budget)
    verified: int  # of those, sent to verification (the sizing's cut)
    accepted: int  # of those, accepted
    draft_time: float  # proposing, then the drafter learning the verdict
    verify_time: float  # the target's forward and the verdict

    @property
    def plain(self) -> bool:
        """No draft was verified: one token, as plain decoding."""
        return self.verified == 0


def synchronize(device: torch.device) -> None:
    """Wait for the device, so that a timing covers the work it names."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def emitted_tokens(draft: Draft, path: list[int], nxt: int, eos_ids: set[int], limit: int) -> list[int]:
    """A verdict's tokens (the accepted path, then the target's next token), cut after an EOS
    and at ``limit``."""
    new = [draft.tokens[n] for n in path] + [nxt]
    for i, tok in enumerate(new):
        if tok in eos_ids:
            new = new[: i + 1]
            break
    return new[:limit]


@dataclass
class Plan:
    """What one step verifies for a request: its draft after ``start`` cached tokens."""

    start: int
    proposed: Draft = field(default_factory=Draft)  # what the drafter proposed (within the budget)
    draft: Draft = field(default_factory=Draft)  # what is verified
    draft_seconds: float = 0.0

    def block(self, root: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The verification block: (ids, positions, tree mask); positions and mask are None for
        a chain (consecutive positions, causal)."""
        ids = torch.tensor([root] + self.draft.tokens)
        if self.draft.is_chain:
            return ids, None, None
        positions = torch.tensor([0] + self.draft.depths()) + self.start
        return ids, positions, self.draft.tree_mask()


@dataclass
class Request:
    """One request's decoding state: its tokens, drafter, draft-length policy, sampling
    parameters and generator. A lone request runs through ``decode``; a batched one through the
    scheduler, with a drafter of its own (``Drafter.fork``)."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    drafter: Drafter
    sizing: object  # sizing.FixedSizing | sizing.PayoffSizing
    eos_ids: set[int]
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    # P(node accepted | parent accepted) for this request, learned from its verdicts: how the
    # batch scheduler shares a step's draft budget among requests.
    acceptance: AcceptanceModel = field(default_factory=AcceptanceModel)

    def begin(self, device: torch.device) -> None:
        """Before the prompt is cached: the generator, the policy and the drafter start."""
        self.generator = None if self.params.greedy else make_generator(device, self.params.seed)
        self.sizing.begin()  # may measure the cost curve: before the cache is filled
        self.tokens = list(self.prompt_ids)
        self.generated = 0
        self.drafter.begin(list(self.prompt_ids))

    @property
    def seeded_sampling(self) -> bool:
        return self.params.seed is not None and not self.params.greedy

    @property
    def stopped(self) -> bool:
        """An EOS was emitted or ``max_new_tokens`` reached."""
        return self.generated >= self.max_new_tokens or (self.generated > 0 and self.tokens[-1] in self.eos_ids)

    def room(self, start: int, max_length: int) -> int:
        """Draft tokens that fit after ``start`` cached ones: the block (root + draft) within the
        context, and nothing drafted past ``max_new_tokens``."""
        return min(self.max_new_tokens - self.generated - 1, max_length - start - 1)

    def plan(self, start: int, max_length: int) -> Plan:
        """Propose a draft within the policy's budget and the room left, and cut it to what is
        worth verifying (which depends on the past only)."""
        room = self.room(start, max_length)
        budget = min(self.sizing.budget(start), room) if room > 0 else 0
        t = time.perf_counter()
        proposed = self.drafter.propose(self.tokens, budget, self.params, self.generator).head(budget) if budget > 0 else Draft()
        draft = self.sizing.cut(proposed, start)
        return Plan(start, proposed, draft, time.perf_counter() - t)

    def settle(self, plan: Plan, logits: torch.Tensor, rule: VerifyRule, keep: Callable[[int, list[int]], None],
               forward_seconds: float, hidden: torch.Tensor | None = None) -> Step:  # fmt: skip
        """The verdict on ``plan`` from the verification forward's ``logits`` (row 0: after the
        root; row i + 1: after draft node i): accept, keep the path's rows in the cache
        (``keep(start, rows)``), let the drafter observe and learn, emit. Returns the step's
        record; ``forward_seconds`` is the forward's time (shared by a batch). ``hidden``: the
        forward's hidden states (rows as the logits'), for a drafter that reads them."""
        draft = plan.draft
        t = time.perf_counter()
        path, nxt = rule.verify(draft, logits, self.params, self.generator)
        rows = [0] + [n + 1 for n in path]
        keep(plan.start, rows)
        t_verdict = time.perf_counter()
        if hidden is not None:
            self.drafter.observe_hidden(hidden[rows])
        self.drafter.observe(self.tokens[-1], draft, logits)
        new = emitted_tokens(draft, path, nxt, self.eos_ids, self.max_new_tokens - self.generated)
        self.tokens.extend(new)
        self.generated += len(new)
        self.drafter.update(self.tokens, len(path), draft)
        self.acceptance.learn_verdict(draft, path)
        verify_seconds = forward_seconds + (t_verdict - t)
        draft_seconds = plan.draft_seconds + (time.perf_counter() - t_verdict)
        self.sizing.record(StepRecord(plan.start, plan.proposed, draft, path, len(new), draft_seconds, verify_seconds))
        return Step(tuple(new), len(plan.proposed), len(draft), len(path), draft_seconds, verify_seconds)


def decode(target: Backend, request: Request, rule: VerifyRule) -> Iterator[Prefill | Step]:
    """Decode ``request`` alone on ``target``'s own cache: a ``Prefill`` record, then a ``Step``
    per verification forward, until ``max_new_tokens``, an EOS, or the end of the context."""
    request.begin(target.device)
    target.reset()
    layers = request.drafter.hidden_layers or None  # the drafter reads hidden states (a trained head)
    t0 = time.perf_counter()
    if len(request.tokens) > 1:
        out = target.forward(torch.tensor(request.tokens[:-1]), logits_rows=None, **hidden_args(layers))
        if layers:
            request.drafter.observe_hidden(out[1])
    synchronize(target.device)
    yield Prefill(time.perf_counter() - t0)
    while not request.stopped and target.length < target.max_length:
        plan = request.plan(target.length, target.max_length)
        ids, positions, tree_mask = plan.block(request.tokens[-1])
        t = time.perf_counter()
        out = target.forward(ids, positions=positions, tree_mask=tree_mask, **hidden_args(layers))
        logits, hidden = out if layers else (out, None)
        synchronize(target.device)
        yield request.settle(plan, logits, rule, target.keep, time.perf_counter() - t, hidden)


def hidden_args(layers: tuple[int, ...] | None) -> dict:
    """The forward's keyword for a drafter's hidden states (none at all for the others, so that
    a backend without the argument still serves them)."""
    return {"hidden_layers": layers} if layers else {}
