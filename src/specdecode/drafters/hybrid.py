"""Hybrid drafting, ``A+B``: a first drafter, and a second one where the first has nothing.

The natural pairing is a free lookup drafter first (pld: copies the prompt, costs nothing) and a
model drafter second (sps, quant: a draft token costs a forward of a smaller model): on text that
repeats its input the lookup drafts for free, elsewhere the model does. Each step's draft comes
from one of them; that one alone is told the verdict (a lookup drafter reads the sequence afresh
at its next proposal, a model drafter re-synchronises its cache with it).
"""

from __future__ import annotations

from ..draft import Draft
from .base import Drafter


class HybridDrafter(Drafter):
    def __init__(self, first: Drafter, second: Drafter):
        self.first, self.second = first, second
        self.name = f"{first.name}+{second.name}"
        self.default_draft_length = max(first.default_draft_length, second.default_draft_length)
        self._source: Drafter | None = None
        self._from_second = 0
        self._steps = 0

    def begin(self, prompt_ids):
        self.first.begin(prompt_ids)
        self.second.begin(prompt_ids)
        self._from_second = self._steps = 0

    def end(self) -> None:
        self.first.end()
        self.second.end()

    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        self._steps += 1
        draft = self.first.propose(tokens, max_tokens, params, generator)
        self._source = self.first
        if not len(draft):
            draft = self.second.propose(tokens, max_tokens, params, generator)
            self._source = self.second
            self._from_second += 1
        return draft

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return self.first.hidden_layers or self.second.hidden_layers

    def observe_hidden(self, hidden) -> None:
        # Both follow the target's cache whichever drafted: a head needs every token's features.
        for part in (self.first, self.second):
            if part.hidden_layers:
                part.observe_hidden(hidden)

    def observe(self, root, draft, logits) -> None:
        self.first.observe(root, draft, logits)  # free by-products: both may learn from them
        self.second.observe(root, draft, logits)

    @property
    def batchable(self) -> bool:
        return self.first.batchable and self.second.batchable

    @property
    def lossless(self) -> bool:
        return self.first.lossless and self.second.lossless

    def fork(self, target=None) -> "HybridDrafter":
        return HybridDrafter(self.first.fork(target), self.second.fork(target))

    @property
    def nbytes(self) -> int:
        return self.first.nbytes + self.second.nbytes

    def forget(self) -> None:
        self.first.forget()
        self.second.forget()

    def update(self, tokens, num_accepted, draft) -> None:
        if self._source is not None:
            self._source.update(tokens, num_accepted, draft)

    def stats(self) -> dict:
        out = {f"{self.first.name}.{k}": v for k, v in self.first.stats().items()}
        out.update({f"{self.second.name}.{k}": v for k, v in self.second.stats().items()})
        out["steps_drafted_by_" + self.second.name] = self._from_second
        return out
