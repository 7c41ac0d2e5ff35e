"""The decoding loop: propose (drafter) -> verify in one target forward -> accept -> roll back.

Invariant of the loop: the target's KV cache holds every token of the sequence but the last;
that last token is the root of the next draft and the first token of the next verification
forward. The output is exactly plain decoding's: greedy keeps the longest draft prefix equal to
the target's argmax plus the target's own next token; sampling uses lossless speculative
sampling (``draft.verify_sampling``).

The loop owns no statistics: it yields one immutable record per phase (a ``Prefill``, then a
``Step`` per verification forward), and whoever drives it folds them (``GenerationStats.add``).
``sizing.StepRecord`` is the draft-length policy's own, richer view of a step (the drafts
themselves), fed to the policy here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .backends import Backend
from .draft import Draft, verify_sampling
from .drafters import Drafter
from .sampling import SamplingParams, make_generator
from .sizing import StepRecord
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


def decode(
    target: Backend,
    drafter: Drafter,
    sizing,
    rule: VerifyRule,
    eos_ids: set[int],
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
) -> Iterator[Prefill | Step]:
    """Decode after ``prompt_ids``: a ``Prefill`` record, then a ``Step`` per verification
    forward, until ``max_new_tokens``, an EOS, or the end of the target's context."""
    generator = None if params.greedy else make_generator(target.device, params.seed)
    sizing.begin()  # may measure the cost curve: before the cache is filled
    target.reset()
    drafter.begin(prompt_ids)
    tokens = list(prompt_ids)
    t0 = time.perf_counter()
    if len(tokens) > 1:
        target.forward(torch.tensor(tokens[:-1]), logits_rows=None)
    synchronize(target.device)
    yield Prefill(time.perf_counter() - t0)
    generated = 0
    while generated < max_new_tokens and target.length < target.max_length:
        start = target.length
        # Room: the verification block (root + nodes) must fit, and no point drafting past the end.
        room = min(max_new_tokens - generated - 1, target.max_length - start - 1)
        budget = min(sizing.budget(start), room) if room > 0 else 0
        t1 = time.perf_counter()
        proposed = drafter.propose(tokens, budget, params, generator).head(budget) if budget > 0 else Draft()
        draft = sizing.cut(proposed, start)  # what is worth verifying; depends on the past only
        t2 = time.perf_counter()
        block = torch.tensor([tokens[-1]] + draft.tokens)
        if draft.is_chain:
            logits = target.forward(block)
        else:
            positions = torch.tensor([0] + draft.depths()) + start
            logits = target.forward(block, positions=positions, tree_mask=draft.tree_mask())
        if params.greedy:
            path, nxt = rule.greedy(draft, logits)
        else:
            path, nxt = verify_sampling(draft, logits, params, generator)
        target.keep(start, [0] + [n + 1 for n in path])
        synchronize(target.device)
        t3 = time.perf_counter()
        drafter.observe(tokens[-1], draft, logits)
        new = emitted_tokens(draft, path, nxt, eos_ids, max_new_tokens - generated)
        tokens.extend(new)
        drafter.update(tokens, len(path), draft)
        t4 = time.perf_counter()
        sizing.record(StepRecord(start, proposed, draft, path, len(new), (t2 - t1) + (t4 - t3), t3 - t2))
        generated += len(new)
        yield Step(tuple(new), len(proposed), len(draft), len(path), (t2 - t1) + (t4 - t3), t3 - t2)
        if new[-1] in eos_ids:
            return
