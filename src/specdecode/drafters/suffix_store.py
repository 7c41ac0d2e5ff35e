"""The cross-request memory of suffix drafting: earlier requests' prompts and outputs.

A bounded set of documents (token sequences) in least-recently-used order, indexed by one
generalised suffix automaton. A document is *used* when it is added and when a draft taken from
it is accepted. When the documents hold more than ``max_tokens`` tokens, the least recently used
ones are dropped until at most ``low_water`` of the bound is left, and the automaton is rebuilt
from the rest: a suffix automaton cannot forget a document, but rebuilding only after a quarter
of the bound has been added again keeps the cost amortised O(1) per added token.

The store lives as long as the drafter that owns it (the engine's): in ``specdecode serve`` that
is the whole process, shared by every request. ``version`` changes on every rebuild, so a
``Matcher`` walking the old automaton knows to start again.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterable

from .suffix_index import SuffixAutomaton


class SuffixStore:
    def __init__(self, max_tokens: int = 100_000, *, count_depth: int = 32, low_water: float = 0.75):
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        self.max_tokens = max_tokens
        self.count_depth = count_depth
        self.low_water = low_water
        self.docs: OrderedDict[int, array] = OrderedDict()  # id -> tokens, least recently used first
        self.total = 0  # tokens in self.docs
        self.index = SuffixAutomaton(count_depth)
        self.version = 0
        self.evicted_docs = 0
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.docs)

    def add(self, tokens: Iterable[int]) -> int | None:
        """Remember a document; returns its id (None if empty). Documents longer than the whole
        bound keep their last ``max_tokens`` tokens."""
        doc = array("i", tokens)
        if len(doc) > self.max_tokens:
            doc = doc[-self.max_tokens :]
        if not doc:
            return None
        doc_id = self._next_id
        self._next_id += 1
        self.docs[doc_id] = doc
        self.total += len(doc)
        if self.total > self.max_tokens:
            self._evict()
        else:
            self.index.add_document(doc, doc_id)
        return doc_id

    def touch(self, doc_id: int) -> None:
        """A draft from ``doc_id`` was accepted: it is the most recently used now."""
        if doc_id in self.docs:
            self.docs.move_to_end(doc_id)

    def clear(self) -> None:
        self.docs.clear()
        self.total = 0
        self._rebuild()

    def _evict(self) -> None:
        target = int(self.max_tokens * self.low_water)
        while self.total > target and len(self.docs) > 1:
            _, doc = self.docs.popitem(last=False)
            self.total -= len(doc)
            self.evicted_docs += 1
        self._rebuild()

    def _rebuild(self) -> None:
        self.index = SuffixAutomaton(self.count_depth)
        for doc_id, doc in self.docs.items():
            self.index.add_document(doc, doc_id)
        self.version += 1

    def stats(self) -> dict:
        return {
            "store_documents": len(self.docs), "store_tokens": self.total, "store_states": len(self.index),
            "store_evicted_documents": self.evicted_docs,
        }  # fmt: skip
