"""Prompt lookup decoding: the draft is what followed an earlier occurrence of the text's tail.

Free to compute, and strong wherever the output repeats its input (summaries, code edits, RAG).
The longest matching suffix n-gram wins, then the most recent occurrence of it.
"""

from __future__ import annotations

from ..draft import Draft
from ..errors import InvalidArgument
from .base import Drafter


class PromptLookupDrafter(Drafter):
    name = "pld"
    default_draft_length = 8

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not isinstance(min_ngram, int) or min_ngram < 1:
            raise InvalidArgument("min_ngram", f"expected an integer >= 1, got {min_ngram!r}")
        if not isinstance(max_ngram, int) or max_ngram < min_ngram:
            raise InvalidArgument("max_ngram", f"expected an integer >= min_ngram ({min_ngram}), got {max_ngram!r}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self._index: dict[tuple[int, ...], list[int]] = {}
        self._indexed = 0  # tokens[:_indexed] have had every n-gram ending in them indexed

    def begin(self, prompt_ids: list[int]) -> None:
        self._index.clear()
        self._indexed = 0

    def _extend_index(self, tokens: list[int]) -> None:
        for end in range(self._indexed + 1, len(tokens) + 1):
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._index.setdefault(tuple(tokens[end - n : end]), []).append(end - n)
        self._indexed = len(tokens)

    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        self._extend_index(tokens)
        length = len(tokens)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            starts = self._index.get(tuple(tokens[length - n :]), ())
            for start in reversed(starts):
                follow = start + n
                if follow < length:  # skip the tail itself, which has nothing after it
                    return Draft.chain(tokens[follow : follow + max_tokens])
        return Draft()
