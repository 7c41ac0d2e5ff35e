"""What a drafter proposes: a token tree rooted at the last accepted token (a chain is a tree
with one branch), and the verification that decides how much of it the target keeps.

Node i has token ``tokens[i]`` and parent ``parents[i]`` (-1: the root, i.e. the last token of
the sequence, not yet in the target's cache). Nodes are in topological order (parents first).
In the verification forward, row 0 is the root and row i + 1 is node i; the logits of a row
predict the token after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, probabilities, sample


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    # Per node, the distribution its token was drawn from (given its earlier siblings were
    # drawn and removed), or None for a deterministic proposal (treated as one-hot).
    probs: list[torch.Tensor | None] | None = None
    # Per node, the drafter's estimate of the probability that the node is accepted given that
    # its parent was (a model drafter's own probability of the token; a lookup drafter's match
    # statistics), or None where the drafter has no such estimate. The engine uses it to choose
    # how much of a draft is worth verifying; it never affects which tokens are accepted.
    confidence: list[float] | None = None

    @classmethod
    def chain(
        cls,
        tokens: list[int],
        probs: list[torch.Tensor | None] | None = None,
        confidence: list[float] | None = None,
    ) -> "Draft":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), probs, confidence)

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, k: int) -> "Draft":
        """The first ``k`` nodes (a valid tree: parents come before their children)."""
        if k >= len(self.tokens):
            return self
        return Draft(
            self.tokens[:k], self.parents[:k], self.probs and self.probs[:k],
            self.confidence and self.confidence[:k],
        )  # fmt: skip

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depths(self) -> list[int]:
        """Depth of each node (children of the root have depth 1)."""
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def tree_mask(self) -> torch.Tensor:
        """[n + 1, n + 1] bool over (root, nodes...): True where row may attend to column."""
        n = len(self.tokens)
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        mask[:, 0] = True
        mask[0, 0] = True
        for i, p in enumerate(self.parents):
            row = i + 1
            if p >= 0:
                mask[row] = mask[p + 1]
            mask[row, row] = True
        return mask

    def children(self) -> dict[int, list[int]]:
        kids: dict[int, list[int]] = {}
        for i, p in enumerate(self.parents):
            kids.setdefault(p, []).append(i)
        return kids


def verify_greedy(draft: Draft, logits: torch.Tensor) -> tuple[list[int], int]:
    """Longest root path whose every token is the target's argmax; then the target's own token.

    Returns (accepted node indices along the path, the next token).
    """
    preds = logits.argmax(dim=-1).tolist()
    kids = draft.children()
    path: list[int] = []
    node = -1
    while True:
        want = preds[node + 1]
        nxt = next((c for c in kids.get(node, ()) if draft.tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


def verify_sampling(
    draft: Draft,
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """Lossless speculative sampling over a tree (a chain is the one-child case).

    At each node the target distribution p is computed from its row. Its children are tried in
    order: child x drawn from q is accepted with probability min(1, p[x] / q[x]); on rejection p
    becomes the normalised max(0, p - q) (for a deterministic child, q is one-hot at x, so p loses
    x). If every child is rejected the next token is drawn from what is left of p. Each emitted
    token is thus distributed exactly as the target's p (Leviathan et al. 2023; with siblings,
    SpecInfer / Sequoia).
    """
    all_p = probabilities(logits, params)
    kids = draft.children()
    path: list[int] = []
    node = -1
    while True:
        p = all_p[node + 1]
        accepted = None
        for c in kids.get(node, ()):
            x = draft.tokens[c]
            q = draft.probs[c] if draft.probs is not None else None
            qx = 1.0 if q is None else float(q[x])
            px = float(p[x])
            u = float(torch.rand((), generator=generator, device=p.device))
            if qx > 0 and u < min(1.0, px / qx):
                accepted = c
                break
            if q is None:
                residual = p.clone()
                residual[x] = 0
            else:
                residual = (p - q.to(p.dtype)).clamp_(min=0)
            total = float(residual.sum())
            if total <= 0:  # p == q up to rounding: the rejection had probability ~0
                continue
            p = residual / total
        if accepted is None:
            return path, sample(p, generator)
        path.append(accepted)
        node = accepted


def verify_specdec(draft: Draft, logits: torch.Tensor, beta: int, tau: float) -> tuple[list[int], int]:
    """SpecDec's relaxed greedy acceptance (Xia et al. 2023), LOSSY: a drafted token is accepted
    when it is among the target's ``beta`` most likely tokens and its log-probability is within
    ``tau`` of the most likely one's. Among several acceptable children the target's favourite
    wins. When none is acceptable the next token is the target's argmax, as in greedy decoding.
    With beta = 1 (any tau) only the argmax is acceptable: exactly ``verify_greedy``.
    """
    if beta == 1:
        return verify_greedy(draft, logits)
    logp = logits.float().log_softmax(dim=-1)
    top = logp.topk(min(beta, logp.shape[-1]), dim=-1)
    top_ids, top_lp = top.indices.tolist(), top.values.tolist()
    argmax = logits.argmax(dim=-1).tolist()  # the greedy token (topk may order ties differently)
    kids = draft.children()
    path: list[int] = []
    node = -1
    while True:
        row = node + 1
        best_lp = top_lp[row][0]
        allowed = {t: lp for t, lp in zip(top_ids[row], top_lp[row]) if lp >= best_lp - tau}
        allowed[argmax[row]] = best_lp
        best = None
        for c in kids.get(node, ()):
            lp = allowed.get(draft.tokens[c])
            if lp is not None and (best is None or lp > allowed[draft.tokens[best]]):
                best = c
        if best is None:
            return path, argmax[row]
        path.append(best)
        node = best
