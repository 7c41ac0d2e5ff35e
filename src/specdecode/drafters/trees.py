"""Growing a draft tree best first, and learning how far to trust a drafter's estimates.

Model-free drafters (suffix, recycle, rest, lookahead) know, for every candidate token, an
estimate of how likely it is to follow its parent (a frequency). ``grow_tree`` turns such
estimates into a draft: it adds nodes in decreasing order of *path probability* (the product of
the estimates from the root down), so a draft's first k nodes are the k most promising ones and
the engine can cut it with ``Draft.head(k)``; parents always come before their children.

Raw frequencies are not acceptance probabilities: "followed by X in 2 of 2 earlier occurrences"
is accepted far less often than 100%. ``Calibration`` maps a drafter's raw estimate to the rate
at which such nodes were actually accepted, learned from the verdicts (``Draft.confidence``
carries the calibrated value; the engine's sizing relies on it).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from itertools import count as _counter
from typing import Any

from ..draft import Draft

# A candidate child: (token, raw estimate in [0, 1], context class for calibration, payload for
# expanding it further).
Candidate = tuple[int, float, int, Any]


def grow_tree(
    roots: Iterable[Candidate],
    expand: Callable[[Any, int], Iterable[Candidate]],
    *,
    budget: int,
    max_depth: int,
    min_prob: float = 0.0,
    chain: bool = False,
    calibration: "Calibration | None" = None,
) -> tuple[Draft, list[tuple[float, int, Any]]]:
    """Best-first draft tree over candidates; several candidates for the same (parent, token)
    (e.g. from two sources) become one node with the best estimate, whose children are the union
    of theirs.

    Returns the draft and, per node, (raw estimate, context class, payload): the first two for
    ``Calibration.learn``, the payload for the drafter's own bookkeeping.
    ``chain``: only the best child of each node (a backend that cannot verify trees).
    """
    tokens: list[int] = []
    parents: list[int] = []
    conf: list[float] = []
    meta: list[tuple[float, int, Any]] = []
    depth: list[int] = []
    where: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    tick = _counter()
    cal = calibration.estimate if calibration is not None else (lambda raw, ctx: raw)
    heap: list = []

    def push(parent: int, path: float, cands: Iterable[Candidate]) -> None:
        for tok, raw, ctx, payload in cands:
            c = cal(raw, ctx)
            p = path * c
            if p > min_prob:
                heapq.heappush(heap, (-p, next(tick), parent, tok, raw, ctx, c, payload))

    push(-1, 1.0, roots)
    while heap and len(tokens) < budget:
        negp, _, parent, tok, raw, ctx, c, payload = heapq.heappop(heap)
        key = (parent, tok)
        node = where.get(key)
        if node is None:
            if chain and parent != len(tokens) - 1:
                continue  # a chain grows only at its end: each node keeps its best child
            node = len(tokens)
            where[key] = node
            tokens.append(tok)
            parents.append(parent)
            conf.append(c)
            meta.append((raw, ctx, payload))
            depth.append(1 if parent < 0 else depth[parent] + 1)
        if depth[node] < max_depth:
            push(node, -negp, expand(payload, tok))
    return Draft(tokens, parents, None, conf), meta


def accepted_path(draft: Draft, accepted_tokens: Sequence[int]) -> list[int]:
    """The nodes of ``draft`` that spell ``accepted_tokens`` from the root."""
    kids = draft.children()
    path: list[int] = []
    node = -1
    for t in accepted_tokens:
        node = next((c for c in kids.get(node, ()) if draft.tokens[c] == t), -2)
        if node == -2:
            break
        path.append(node)
    return path


def outcomes(draft: Draft, path: list[int]) -> list[tuple[int, bool]]:
    """Nodes whose parent was accepted (so the verifier looked at them), and whether each was
    accepted."""
    on_path = set(path)
    reached = {-1, *path}
    return [(i, i in on_path) for i, p in enumerate(draft.parents) if p in reached]


class Calibration:
    """Acceptance rate of nodes by (raw estimate bucket, context class), learned online.

    The estimate for a bucket is a running mean pulled towards the raw value by ``prior``
    pseudo-observations, so an empty bucket answers the raw estimate itself. Counts decay slowly
    (``decay`` per recorded node) so the table follows a change of text.
    """

    def __init__(self, buckets: int = 10, prior: float = 4.0, decay: float = 0.999):
        self.buckets = buckets
        self.prior = prior
        self.decay = decay
        self.hits: dict[tuple[int, int], float] = {}
        self.seen: dict[tuple[int, int], float] = {}

    def _key(self, raw: float, ctx: int) -> tuple[int, int]:
        return min(int(raw * self.buckets), self.buckets - 1), ctx

    def estimate(self, raw: float, ctx: int) -> float:
        k = self._key(raw, ctx)
        n = self.seen.get(k, 0.0)
        if n == 0.0:
            return raw
        return (self.hits[k] + self.prior * raw) / (n + self.prior)

    def record(self, raw: float, ctx: int, accepted: bool) -> None:
        k = self._key(raw, ctx)
        self.hits[k] = self.hits.get(k, 0.0) * self.decay + (1.0 if accepted else 0.0)
        self.seen[k] = self.seen.get(k, 0.0) * self.decay + 1.0

    def learn(self, draft: Draft, meta: list[tuple], path: list[int]) -> None:
        """Record the verdict on ``draft`` (built with ``meta``), given its accepted ``path``."""
        for node, ok in outcomes(draft, path):
            if node < len(meta):
                self.record(meta[node][0], meta[node][1], ok)
