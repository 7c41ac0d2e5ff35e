"""Suffix drafting: continue the text the way it continued before, here or in earlier requests.

(After SuffixDecoding, Oliaro et al. 2024, and SAM-Decoding, Hu et al. 2024.) Two indexes, both
suffix automata (``suffix_index.py``):

* the request's own text (prompt and output so far), extended token by token;
* a store of earlier requests' prompts and outputs (``suffix_store.py``): bounded, least recently
  used out first, shared by every request the drafter serves, optionally seeded from a corpus
  file (``corpus=FILE``, text or jsonl).

At each step each index gives the longest suffix of the text that occurred in it (amortised O(1)
per token). From those matches, continuations are scored by how often each token followed the
matched context (and, further down, the context plus the tokens drafted so far), and the draft is
grown best first by the product of these estimates (``trees.grow_tree``): a small tree of the most
likely continuations, where both indexes' candidates meet in one tree. The longer the match, the
more nodes a draft may have (``alpha`` per matched token) — long matches are copies worth
following far; short ones are guesses.

A draft's confidences are calibrated acceptance rates (``trees.Calibration``), learned per
source and match length from the verdicts.
"""

from __future__ import annotations

from ..corpus import tokenize_documents
from ..draft import Draft
from ..errors import InvalidArgument
from .. import checks as opt
from .base import Drafter
from .suffix_index import Matcher, SuffixAutomaton
from .suffix_store import SuffixStore
from .trees import Calibration, Candidate, accepted_path, grow_tree

LOCAL, STORE = 0, 1


def _length_class(n: int) -> int:
    """Match lengths that behave alike: 1, 2-3, 4-7, 8-15, 16+."""
    return min(n.bit_length() - 1, 4) if n > 0 else 0


# How much a continuation's frequency is worth by match length class, per index: a one-token
# match predicts poorly (its continuation was accepted ~17% of the time where the frequency said
# 50%), a long one well; earlier requests' text less than the request's own. Measured on
# Spec-Bench with smollm2-135m; only the starting point: Calibration learns the real rates.
TRUST = {LOCAL: (0.4, 1.0, 1.2, 1.5, 1.6), STORE: (0.25, 0.5, 0.9, 1.3, 1.6)}


class AutomatonSource:
    """Candidates from one suffix automaton, starting at a matched state."""

    def __init__(self, kind: int, index: SuffixAutomaton, branch: int):
        self.kind = kind
        self.index = index
        self.branch = branch

    def candidates(self, state: int, context: int) -> list[Candidate]:
        """Children of a node whose context (``context`` tokens long) is ``state``'s strings."""
        conts = self.index.continuations(state)
        total = sum(c for _, _, c in conts)
        conts = conts[: self.branch]
        length_class = _length_class(context)
        ctx = self.kind * 8 + length_class
        trust = TRUST[self.kind][length_class]
        # One unseen continuation's worth of doubt (1 of 1 is 0.5, 9 of 9 is 0.9), weighed by
        # how well matches of this length predict.
        return [
            (tok, min(0.95, trust * cnt / (total + 1)), ctx, (self, (to, context + 1))) for tok, to, cnt in conts
        ]

    def expand(self, data, token: int) -> list[Candidate]:
        state, context = data
        return self.candidates(state, context)


class SuffixDrafter(Drafter):
    name = "suffix"
    default_draft_length = 16  # most nodes per step

    def __init__(
        self,
        *,
        tokenizer=None,
        store_tokens: int = 100_000,
        corpus: str | None = None,
        alpha: float = 4.0,
        max_depth: int = 24,
        branch: int = 4,
        min_match: int = 1,
        min_prob: float = 0.2,
        count_depth: int = 32,
        tree: bool = True,
    ):
        self.store_tokens = opt.integer("store_tokens", store_tokens, 0)
        self.alpha = opt.number("alpha", alpha, 0.0, open_low=True)
        self.max_depth = opt.integer("max_depth", max_depth)
        self.branch = opt.integer("branch", branch)
        self.min_match = opt.integer("min_match", min_match)
        self.min_prob = opt.number("min_prob", min_prob, 0.0, 1.0)
        self.count_depth = opt.integer("count_depth", count_depth)
        self.tree = opt.flag("tree", tree)
        self.store = SuffixStore(self.store_tokens, count_depth=self.count_depth) if self.store_tokens else None
        if corpus is not None:
            self._seed(corpus, tokenizer)
        self.calibration = Calibration()
        self._seq: list[int] = []  # the current request's tokens, as far as indexed
        self.local = SuffixAutomaton(self.count_depth)
        self.matcher: Matcher | None = None
        self._matcher_version = -1
        self._meta: list = []
        self._propose_len = 0
        self._reset_request_stats()

    def _seed(self, corpus, tokenizer) -> None:
        if not isinstance(corpus, str) or not corpus:
            raise InvalidArgument("corpus", f"expected a file name, got {corpus!r}")
        if self.store is None:
            raise InvalidArgument("corpus", "a corpus seeds the cross-request store, which store_tokens=0 turns off")
        if tokenizer is None:
            raise InvalidArgument("corpus", "reading a corpus needs the model's tokenizer")
        chunk = max(1, min(4096, self.store_tokens // 4))  # eviction works on whole documents
        for ids in tokenize_documents(tokenizer, corpus):
            for start in range(0, len(ids), chunk):
                self.store.add(ids[start : start + chunk])

    # ---- the request's text ------------------------------------------------------------------
    def _reset_request_stats(self) -> None:
        self._steps = 0
        self._match_total = 0
        self._store_accepted = 0
        self._local_accepted = 0

    def begin(self, prompt_ids: list[int]) -> None:
        self.end()  # the previous request, if not ended yet, joins the store
        self.local = SuffixAutomaton(self.count_depth)
        self.local.start_document()
        if self.store is not None:
            self.matcher = Matcher(self.store.index)
            self._matcher_version = self.store.version
        self._meta = []
        self._reset_request_stats()

    def end(self) -> None:
        """The request's text joins the store now (in a batch, requests end apart and their
        copies never begin another request; alone, the next ``begin`` would do it)."""
        if self.store is not None and self._seq:
            self.store.add(self._seq)
        self._seq = []

    def _feed(self, tokens: list[int]) -> None:
        if self.store is not None and self._matcher_version != self.store.version:
            # The store was rebuilt (another request sharing it was added): match again from
            # a recent window of the text.
            self.matcher = Matcher(self.store.index)
            self.matcher.feed(self._seq[-4 * self.count_depth :])
            self._matcher_version = self.store.version
        for t in tokens[len(self._seq) :]:
            self._seq.append(t)
            self.local.extend(t)
            if self.matcher is not None:
                self.matcher.step(t)

    def matches(self) -> tuple[int, int]:
        """Lengths of the longest matches of the text's end: in the request, in the store."""
        return self.local.earlier_match()[1], self.matcher.length if self.matcher is not None else 0

    def sources(self, tokens: list[int]) -> tuple[list[Candidate], int]:
        """The first-level candidates of both indexes after ``tokens``, and the longest match."""
        self._feed(tokens)
        roots: list[Candidate] = []
        state, length = self.local.earlier_match()
        longest = 0
        if length >= self.min_match:
            roots += AutomatonSource(LOCAL, self.local, self.branch).candidates(state, length)
            longest = length
        if self.matcher is not None and self.matcher.length >= self.min_match:
            roots += AutomatonSource(STORE, self.store.index, self.branch).candidates(self.matcher.state, self.matcher.length)
            longest = max(longest, self.matcher.length)
        self._steps += 1
        self._match_total += longest
        return roots, longest

    def node_budget(self, longest: int, max_tokens: int) -> int:
        return min(max_tokens, max(1, int(self.alpha * longest)))

    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        roots, longest = self.sources(tokens)
        self._propose_len = len(tokens)
        if not roots:
            self._meta = []
            return Draft()
        draft, self._meta = grow_tree(
            roots, _expand, budget=self.node_budget(longest, max_tokens), max_depth=self.max_depth,
            min_prob=self.min_prob, chain=not self.tree, calibration=self.calibration,
        )  # fmt: skip
        return draft

    def update(self, tokens, num_accepted, draft) -> None:
        self.learn(tokens, num_accepted, draft, self._meta, self._propose_len, self.calibration)
        self._meta = []

    def learn(self, tokens, num_accepted, draft, meta, propose_len, calibration) -> None:
        """The verdict on a draft grown (by this drafter or one combining it with other sources)
        from ``meta``, proposed after ``propose_len`` tokens."""
        self._feed(tokens)  # the last step's tokens too, before the request joins the store
        if not len(draft) or not meta:
            return
        path = accepted_path(draft, tokens[propose_len : propose_len + num_accepted])
        calibration.learn(draft, meta, path)
        for node in path:
            source, data = meta[node][2]
            if not isinstance(source, AutomatonSource):
                continue
            if source.kind == STORE:
                self._store_accepted += 1
                self.store.touch(source.index.doc[data[0]])
            else:
                self._local_accepted += 1

    def shared(self) -> list[object]:
        return [self.store] if self.store is not None else []

    def forget(self) -> None:
        """Drop the earlier requests' text (the store); the calibration stays."""
        if self.store is not None:
            self.store.clear()
        self._seq = []

    def stats(self) -> dict:
        out = {
            "mean_match_length": self._match_total / self._steps if self._steps else 0.0,
            "accepted_from_request": self._local_accepted,
            "accepted_from_store": self._store_accepted,
        }
        if self.store is not None:
            out.update(self.store.stats())
        return out


def _expand(payload, token: int) -> list[Candidate]:
    source, data = payload
    return source.expand(data, token)
