"""REST: retrieval-based drafting from a datastore built once from a corpus.

(He et al., "REST: Retrieval-Based Speculative Decoding", NAACL 2024.) At each step the longest
suffix of the text (up to ``max_match`` tokens) is looked up in the datastore's suffix array
(``specdecode.datastore``); what followed its occurrences (up to ``samples`` of them, ``depth``
tokens each) is merged into a trie whose node counts say how often each continuation was seen,
and the draft is that trie grown best first by count ratios (``trees.grow_tree``). Build the
datastore with ``specdecode datastore build CORPUS -o DIR --model MODEL`` and pass
``-o datastore=DIR``; it must come from the target's tokenizer.
"""

from __future__ import annotations

from ..datastore import Datastore, tokenizer_fingerprint
from ..draft import Draft
from ..errors import InvalidArgument
from .. import checks as opt
from .base import Drafter
from .trees import Calibration, Candidate, accepted_path, grow_tree


class _Trie:
    __slots__ = ("count", "kids")

    def __init__(self) -> None:
        self.count = 0
        self.kids: dict[int, _Trie] = {}


def continuation_trie(continuations: list[list[int]]) -> _Trie:
    root = _Trie()
    for cont in continuations:
        node = root
        node.count += 1
        for t in cont:
            node = node.kids.setdefault(t, _Trie())
            node.count += 1
    return root


class RestDrafter(Drafter):
    name = "rest"
    default_draft_length = 12

    def __init__(
        self,
        *,
        datastore: str | None = None,
        tokenizer=None,
        max_match: int = 16,
        min_match: int = 2,
        samples: int = 64,
        depth: int = 10,
        min_prob: float = 0.15,
        tree: bool = True,
    ):
        if not isinstance(datastore, str) or not datastore:
            raise InvalidArgument("datastore", "rest needs -o datastore=DIR (build one with `specdecode datastore build`)")
        self.max_match = opt.integer("max_match", max_match)
        self.min_match = opt.integer("min_match", min_match)
        if self.min_match > self.max_match:
            raise InvalidArgument("min_match", f"expected at most max_match ({max_match}), got {min_match}")
        self.samples = opt.integer("samples", samples)
        self.depth = opt.integer("depth", depth)
        self.min_prob = opt.number("min_prob", min_prob, 0.0, 1.0)
        self.tree = opt.flag("tree", tree)
        self.store = Datastore.load(datastore)
        if tokenizer is not None and self.store.meta.get("tokenizer") != tokenizer_fingerprint(tokenizer):
            raise InvalidArgument(
                "datastore", f"{datastore!r} was built with another tokenizer ({self.store.meta.get('model')!r}); build it with this model's"
            )
        self.calibration = Calibration()
        self._meta: list = []
        self._propose_len = 0
        self._steps = self._matched = 0

    def shared(self) -> list[object]:
        return [self.store]  # read-only, possibly large: every request of a batch reads the one

    def begin(self, prompt_ids: list[int]) -> None:
        self._meta = []
        self._steps = self._matched = 0

    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        self._propose_len = len(tokens)
        self._steps += 1
        lo, hi, length = self.store.longest_match(tokens, self.max_match, self.min_match)
        conts = self.store.continuations(lo, hi, length, min(self.depth, max_tokens), self.samples) if length else []
        if not conts:
            self._meta = []
            return Draft()
        self._matched += 1
        trie = continuation_trie(conts)
        ctx = min(length, 8)

        def children(node: _Trie) -> list[Candidate]:
            return [(t, kid.count / (node.count + 1), ctx, kid) for t, kid in node.kids.items()]

        draft, self._meta = grow_tree(
            children(trie), lambda node, tok: children(node), budget=max_tokens, max_depth=self.depth,
            min_prob=self.min_prob, chain=not self.tree, calibration=self.calibration,
        )  # fmt: skip
        return draft

    def update(self, tokens, num_accepted, draft) -> None:
        if len(draft) and self._meta:
            path = accepted_path(draft, tokens[self._propose_len : self._propose_len + num_accepted])
            self.calibration.learn(draft, self._meta, path)
        self._meta = []

    def stats(self) -> dict:
        return {"datastore_tokens": int(self.store.meta.get("tokens", 0)), "matched_steps": self._matched, "steps": self._steps}
