"""Draft-model speculative decoding (SpS): a small model with the same tokenizer drafts a chain.

The draft model keeps its own KV cache in step with the accepted text: after each verdict it is
rolled back to the longest prefix it shares with the new sequence, so it never re-reads the
context. With temperature > 0 it samples from its own distribution under the same settings and
hands those distributions to verification (min(1, p/q) acceptance).
"""

from __future__ import annotations

import torch

from ..backends import Backend
from ..draft import Draft
from ..errors import InvalidArgument
from ..sampling import probabilities, sample
from .base import Drafter


class DraftModelDrafter(Drafter):
    name = "sps"
    default_draft_length = 4
    default_adaptive = True

    def __init__(self, draft_backend: Backend):
        self.model = draft_backend
        self._cached: list[int] = []  # the tokens whose keys/values are in the draft cache

    def fork(self, target=None) -> "DraftModelDrafter":
        """A drafter for one request of a batch: the same draft model (weights shared) over a
        KV cache of its own."""
        if not hasattr(self.model, "with_cache"):
            raise InvalidArgument(
                "draft_model", f"batched sps keeps a cache per request, which the {self.model.name!r} backend's draft model "
                "cannot; load it with backend='native'"
            )  # fmt: skip
        return DraftModelDrafter(self.model.with_cache(self.model.new_cache()))

    @property
    def nbytes(self) -> int:
        """The draft model's weights (where its backend counts them) and its cache."""
        return getattr(self.model, "weight_bytes", 0) + self.model.cache_bytes

    def begin(self, prompt_ids: list[int]) -> None:
        self.model.reset()
        self._cached = []

    def _sync(self, tokens: list[int]) -> None:
        """Roll the draft cache back to the longest prefix it shares with ``tokens``."""
        common = 0
        limit = min(len(self._cached), len(tokens))
        while common < limit and self._cached[common] == tokens[common]:
            common += 1
        self.model.truncate(common)
        del self._cached[common:]

    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        self._sync(tokens)
        room = self.model.max_length - len(tokens)
        max_tokens = min(max_tokens, room)
        if max_tokens <= 0:
            return Draft()
        # Feed what the draft model has not seen (at least the last token), then one at a time.
        feed = tokens[len(self._cached) :]
        if not feed:  # everything is cached: re-run the last token for its logits
            self._sync(tokens[:-1])
            feed = tokens[-1:]
        drafted: list[int] = []
        dists: list[torch.Tensor | None] = []
        for i in range(max_tokens):
            logits = self.model.forward(torch.tensor(feed), logits_rows=slice(-1, None))[0]
            self._cached.extend(feed)
            if params.greedy:
                tok = int(logits.argmax())
                dists.append(None)
            else:
                q = probabilities(logits, params)
                tok = sample(q, generator)
                dists.append(q)
            drafted.append(tok)
            feed = [tok]
        return Draft.chain(drafted, None if params.greedy else dists)

    def update(self, tokens, num_accepted, draft) -> None:
        self._sync(tokens)
