"""The drafter interface: propose a draft, then learn from the verdict.

The decoding loop never looks inside a drafter. New methods (layer skipping, n-gram pools,
trees) implement these three calls and register a name, with what they need, in
``drafters/registry.py``.
"""

from __future__ import annotations

import copy

import torch

from ..draft import Draft
from ..sampling import SamplingParams


class Drafter:
    name = "base"
    default_draft_length: int = 4
    default_adaptive: bool = False

    @classmethod
    def create(cls, target, **options) -> "Drafter":
        """Build this drafter for ``target`` (a Backend) with the method's options."""
        return cls(**options)

    def begin(self, prompt_ids: list[int]) -> None:
        """A new request starts with these tokens."""

    def end(self) -> None:
        """The request is over (finished, stopped or cancelled). The batch scheduler calls it on a
        request's own copy, which no later request begins on; drafters with memory across
        requests keep what the request taught them here."""

    def propose(
        self,
        tokens: list[int],
        max_tokens: int,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> Draft:
        """Propose at most ``max_tokens`` nodes to follow ``tokens`` (the whole sequence so far)."""
        raise NotImplementedError

    def observe(self, root: int, draft: Draft, logits: torch.Tensor) -> None:
        """The verification forward's logits, a free by-product: row 0 is the target's prediction
        after ``root`` (the last token before the draft), row i + 1 after node i of ``draft``
        (given its ancestors). Called every step, before ``update``; drafters that learn from
        the target's distributions (token recycling, lookahead's Jacobi window) override it."""

    # The target's hidden states this drafter reads (``Backend.forward``'s ``hidden_layers``
    # numbering); empty: none. A drafter that names some is handed them for every token that
    # enters the target's cache (``observe_hidden``), from the forwards the decoding step runs
    # anyway: the trained heads (eagle, medusa, specdec) draft from them.
    hidden_layers: tuple[int, ...] = ()

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        """The target's hidden states [rows, len(hidden_layers), D] of the tokens that just
        entered its cache, in order: the prompt's after the prefill, the accepted path's (the
        root and the accepted nodes) after each verification."""

    def update(self, tokens: list[int], num_accepted: int, draft: Draft) -> None:
        """The verdict: ``num_accepted`` nodes of ``draft`` were kept; ``tokens`` is the new sequence."""

    # ---- many requests at once (the batch scheduler) ---------------------------------------------
    # A drafter that can follow one more request beside others says so (``batchable``); the
    # registry declares it for the built-in methods. ``fork`` gives each batched request its own.
    batchable = False
    lossless = True  # its output is the target's own (set by the registry for its methods)

    def shared(self) -> list[object]:
        """What every copy of this drafter shares instead of copying: memory across requests
        (suffix's store of earlier requests, token recycling's table: copying either would cost
        more than a step, and what a request taught it would be lost with the copy), models."""
        return []

    def fork(self, target=None) -> "Drafter":
        """A drafter for one more request decoded beside others: its own per-request state,
        sharing ``shared()`` with this one. ``target``: the target over that request's own
        cache, for drafters that draft through the target."""
        memo = {id(obj): obj for obj in self.shared()}
        return copy.deepcopy(self, memo)

    def forget(self) -> None:
        """Drop the text remembered from earlier requests (a benchmark calls it after warming
        up, so that a method's memory starts cold on the timed questions). What a drafter
        learned about itself (how far to trust its estimates) may stay."""

    @property
    def nbytes(self) -> int:
        """Memory this drafter adds to the target's (weights of its own, caches of its own)."""
        return 0

    def stats(self) -> dict:
        """Method-specific statistics for the last request (merged into the result's stats)."""
        return {}


class VanillaDrafter(Drafter):
    """No drafting: plain autoregressive decoding through the same engine (the baseline)."""

    name = "vanilla"
    default_draft_length = 0

    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        return Draft()
