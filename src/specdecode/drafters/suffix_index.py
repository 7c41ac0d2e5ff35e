"""A suffix automaton over token sequences, with occurrence counts: the index of suffix drafting.

A suffix automaton (Blumer et al. 1985) is the smallest automaton that accepts every substring
of the text it was built from. Each state is a class of substrings that end at the same set of
positions (their *endpos*); ``length[v]`` is the longest of them and ``link[v]`` leads to the
state of the longest suffix outside the class. It is built online, one token at a time, in
amortised constant time per token, and holds at most 2n states and 3n transitions for n tokens.
Several documents go into one automaton (a *generalised* suffix automaton): each starts again
from the root, so a match never runs across two documents.

What drafting needs from it:

* **The longest match.** Reading a sequence token by token, ``Matcher.step`` keeps the longest
  suffix of what was read that occurs in the indexed text (follow the token's transition; if
  there is none, shorten the match along suffix links first). Amortised O(1) per token: the match
  grows by at most one per token and every link followed shortens it.
* **Continuations and how often each was seen.** From the state of a match, each transition is a
  token that followed the match somewhere, and ``count`` of the state it leads to is how many
  times the match followed by that token occurs. Continuation trees are read off by following
  transitions further.

Counts. A new position adds one to the count of every state on its suffix-link chain, which is as
long as the longest earlier match of the text's end: on repetitive text that is long, and walking
it all would make building quadratic. So only the part of the chain with strings of at most
``count_depth`` tokens is walked, starting from a pointer to the state of the text's last
``count_depth`` tokens that is kept up to date in amortised O(1). Counts are therefore exact for
every state whose shortest string has at most ``count_depth`` tokens and a lower bound (>= 1)
for deeper ones, where the context is long enough that the first continuation rarely has rivals.

Memory: states are parallel arrays plus one dict of transitions per state, a few hundred bytes
per indexed token in CPython.
"""

from __future__ import annotations

from array import array


class SuffixAutomaton:
    ROOT = 0

    def __init__(self, count_depth: int = 32):
        if count_depth < 1:
            raise ValueError("count_depth must be >= 1")
        self.count_depth = count_depth
        self.length = array("i", [0])
        self.link = array("i", [-1])
        self.count = array("i", [0])
        self.doc = array("i", [-1])  # the latest document a string of the state ended in (exact when shallow)
        self.next: list[dict[int, int]] = [{}]
        self.tokens = 0  # tokens indexed
        self.documents = 0
        # The document being added: its whole text's state, and the state of its last
        # min(count_depth, len) tokens with that length.
        self._last = 0
        self._shallow = 0
        self._shallow_len = 0
        self._doc_id = -1

    def __len__(self) -> int:
        return len(self.length)

    # ---- building ------------------------------------------------------------------------------
    def start_document(self, doc_id: int | None = None) -> int:
        """Begin a new document (the next tokens do not continue the previous one's text)."""
        self._last = self._shallow = self.ROOT
        self._shallow_len = 0
        self._doc_id = self.documents if doc_id is None else doc_id
        self.documents += 1
        return self._doc_id

    def add_document(self, tokens, doc_id: int | None = None) -> int:
        doc = self.start_document(doc_id)
        for t in tokens:
            self.extend(t)
        return doc

    def _new_state(self, length: int, link: int, count: int, doc: int, nxt: dict[int, int]) -> int:
        self.length.append(length)
        self.link.append(link)
        self.count.append(count)
        self.doc.append(doc)
        self.next.append(nxt)
        return len(self.length) - 1

    def _clone(self, p: int, q: int, c: int) -> int:
        """Split state q: its strings of at most length[p] + 1 tokens move to a new state."""
        length, link, nxt = self.length, self.link, self.next
        clone = self._new_state(length[p] + 1, link[q], self.count[q], self.doc[q], dict(nxt[q]))
        while p != -1 and nxt[p].get(c) == q:
            nxt[p][c] = clone
            p = link[p]
        link[q] = clone
        return clone

    def extend(self, c: int) -> None:
        """Append token ``c`` to the current document."""
        length, link, nxt = self.length, self.link, self.next
        last = self._last
        q = nxt[last].get(c)
        if q is not None:
            # Generalised automaton: this document's text so far already occurs (in another
            # document); no new state, at most a split.
            self._last = q if length[q] == length[last] + 1 else self._clone(last, q, c)
        else:
            cur = self._new_state(length[last] + 1, 0, 0, self._doc_id, {})
            p = last
            while p != -1 and c not in nxt[p]:
                nxt[p][c] = cur
                p = link[p]
            if p != -1:
                q = nxt[p][c]
                link[cur] = q if length[p] + 1 == length[q] else self._clone(p, q, c)
            self._last = cur
        self.tokens += 1
        self._count_new_position(c)

    def _count_new_position(self, c: int) -> None:
        length, link = self.length, self.link
        # Move the shallow pointer: a split may have moved its string to a new state (shorter
        # strings go to the clone, which becomes the link); then read the token.
        w, wl = self._shallow, self._shallow_len
        while w != self.ROOT and wl <= length[link[w]]:
            w = link[w]
        w = self.next[w][c]
        wl += 1
        if wl > self.count_depth:
            wl = self.count_depth
            while length[link[w]] >= wl:
                w = link[w]
        self._shallow, self._shallow_len = w, wl
        # Every shallow state on the chain gained this end position.
        count, doc, d = self.count, self.doc, self._doc_id
        v = w
        while v != self.ROOT:
            count[v] += 1
            doc[v] = d
            v = link[v]
        # The document's own (deep) state has at least this occurrence.
        if count[self._last] == 0:
            count[self._last] = 1

    # ---- reading -------------------------------------------------------------------------------
    @property
    def last(self) -> int:
        """The state of the current document's whole text."""
        return self._last

    def continuations(self, state: int) -> list[tuple[int, int, int]]:
        """(token, next state, count) for every token that followed the strings of ``state``,
        most frequent first."""
        count = self.count
        out = [(tok, to, count[to]) for tok, to in self.next[state].items()]
        out.sort(key=lambda x: -x[2])
        return out

    def earlier_match(self) -> tuple[int, int]:
        """The longest suffix of the current document that also occurs earlier (with something
        after it): (state, length). Reading the document one token at a time, its own state is
        new, and its suffix link is exactly that match."""
        v = self.link[self._last] if self._last != self.ROOT else -1
        if v <= self.ROOT:
            return self.ROOT, 0
        return v, self.length[v]


class Matcher:
    """The longest suffix of a token stream that occurs in an automaton (which must not change
    while it is used; ``reset`` after it did)."""

    def __init__(self, index: SuffixAutomaton):
        self.index = index
        self.state = SuffixAutomaton.ROOT
        self.length = 0

    def reset(self) -> None:
        self.state, self.length = SuffixAutomaton.ROOT, 0

    def step(self, c: int) -> None:
        ix = self.index
        v, n = self.state, self.length
        while v != ix.ROOT and c not in ix.next[v]:
            v = ix.link[v]
            n = ix.length[v]
        to = ix.next[v].get(c)
        if to is None:
            self.state, self.length = ix.ROOT, 0
        else:
            self.state, self.length = to, n + 1

    def feed(self, tokens) -> None:
        for c in tokens:
            self.step(c)
