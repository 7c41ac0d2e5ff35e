"""Token Recycling: draft from the candidates the target itself ranked highly before.

(Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language Models with
Token Recycling", ACL 2025.) Every verification forward computes the target's distribution after
each token of the block; its top-k are thrown away once the step is decided. Kept instead, per
vocabulary id, as "the k tokens that most likely follow this one" (the latest observation wins),
they make a free drafter: starting from the last token, follow those lists breadth first into a
tree. The paper's tree has 80 nodes, sized for a GPU, where 80 tokens cost about what one does;
here the tree is grown best first by the recorded probabilities (``trees.grow_tree``) and the
engine's sizing cuts it, so it fits the machine's cost curve. The drafter's own floor
(``min_prob``) is low on purpose: where verifying one more token costs nothing (a CPU that pads
single rows to 2-row products for exactness, a GPU), even a 10% candidate is worth verifying,
and only the sizing, which knows the cost curve, can tell; the floor just bounds the work of
growing the tree. The table survives across requests (the paper's "hot start").

``SuffixRecycleDrafter`` (``suffix+recycle``) drafts from the suffix indexes where they match at
least ``recycle_below`` tokens and adds recycled candidates to the tree where the match is shorter
(as SAM-Decoding does with its auxiliary drafter).
"""

from __future__ import annotations

import torch

from ..draft import Draft
from ..errors import InvalidArgument
from .. import checks as opt
from .base import Drafter
from .suffix import SuffixDrafter, _expand
from .trees import Calibration, Candidate, accepted_path, grow_tree

RECYCLED = 100  # calibration context class of recycled candidates (suffix uses 0..15)


class RecycleTable:
    """token -> [(next token, probability)] from the latest distribution seen after it."""

    def __init__(self, k: int, branch: int):
        self.k = k
        self.branch = branch
        self.rows: dict[int, list[tuple[int, float]]] = {}

    def observe(self, tokens: list[int], logits: torch.Tensor) -> None:
        """Row i of ``logits`` is the target's prediction after ``tokens[i]``."""
        logits = logits[: len(tokens)].float()
        top = logits.topk(self.k, dim=-1)
        probs = (top.values - logits.logsumexp(dim=-1, keepdim=True)).exp()
        for tok, ids, ps in zip(tokens, top.indices.tolist(), probs.tolist()):
            self.rows[tok] = list(zip(ids, ps))

    def candidates(self, token: int, depth: int) -> list[Candidate]:
        ctx = RECYCLED + min(depth, 3)
        # The probability was the target's after this token in *another* context: as an
        # estimate of acceptance here it is optimistic by about half (measured on Spec-Bench).
        return [(t, 0.5 * p, ctx, (self, depth + 1)) for t, p in self.rows.get(token, ())[: self.branch]]

    def expand(self, depth: int, token: int) -> list[Candidate]:
        return self.candidates(token, depth)


class RecycleDrafter(Drafter):
    name = "recycle"
    default_draft_length = 12

    def __init__(self, *, k: int = 8, branch: int = 4, max_depth: int = 8, min_prob: float = 0.02, tree: bool = True):
        self.table = RecycleTable(opt.integer("k", k), opt.integer("branch", branch))
        if branch > k:
            raise InvalidArgument("branch", f"expected at most k ({k}) children per node, got {branch}")
        self.max_depth = opt.integer("max_depth", max_depth)
        self.min_prob = opt.number("min_prob", min_prob, 0.0, 1.0)
        self.tree = opt.flag("tree", tree)
        self.calibration = Calibration()
        self._meta: list = []
        self._propose_len = 0

    def begin(self, prompt_ids: list[int]) -> None:
        self._meta = []

    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        self._propose_len = len(tokens)
        roots = self.table.candidates(tokens[-1], 0)
        if not roots:
            self._meta = []
            return Draft()
        draft, self._meta = grow_tree(
            roots, _expand, budget=max_tokens, max_depth=self.max_depth, min_prob=self.min_prob,
            chain=not self.tree, calibration=self.calibration,
        )  # fmt: skip
        return draft

    def observe(self, root: int, draft: Draft, logits: torch.Tensor) -> None:
        self.table.observe([root, *draft.tokens], logits)

    def update(self, tokens, num_accepted, draft) -> None:
        if len(draft) and self._meta:
            path = accepted_path(draft, tokens[self._propose_len : self._propose_len + num_accepted])
            self.calibration.learn(draft, self._meta, path)
        self._meta = []

    def shared(self) -> list[object]:
        return [self.table]

    def forget(self) -> None:
        self.table.rows.clear()

    def stats(self) -> dict:
        return {"recycle_table_rows": len(self.table.rows)}


class SuffixRecycleDrafter(Drafter):
    name = "suffix+recycle"
    default_draft_length = 16

    def __init__(
        self,
        *,
        recycle_below: int = 4,
        k: int = 8,
        recycle_branch: int = 4,
        recycle_depth: int = 8,
        tree: bool = True,
        **suffix_options,
    ):
        self.recycle_below = opt.integer("recycle_below", recycle_below, 0)
        self.suffix = SuffixDrafter(tree=tree, **suffix_options)
        self.recycle = RecycleDrafter(k=k, branch=recycle_branch, max_depth=recycle_depth, tree=tree)
        self.tree = tree
        self.calibration = Calibration()  # one table for both kinds of candidates
        self._meta: list = []
        self._propose_len = 0
        self._recycled_steps = 0

    def begin(self, prompt_ids: list[int]) -> None:
        self.suffix.begin(prompt_ids)
        self.recycle.begin(prompt_ids)
        self._meta = []
        self._recycled_steps = 0

    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        self._propose_len = len(tokens)
        roots, longest = self.suffix.sources(tokens)
        budget = self.suffix.node_budget(longest, max_tokens)
        if longest < self.recycle_below:
            roots = roots + self.recycle.table.candidates(tokens[-1], 0)
            budget = max_tokens
            self._recycled_steps += 1
        if not roots:
            self._meta = []
            return Draft()
        draft, self._meta = grow_tree(
            roots, _expand, budget=budget, max_depth=max(self.suffix.max_depth, self.recycle.max_depth),
            # suffix's floor for both kinds of candidates: with recycle's lower one, the combined
            # drafts did worse on SmolLM2 (1.49x -> 1.40x, 1.66 -> 1.54 tokens per step; on
            # Qwen 1.19x -> 1.20x), though recycle alone gained from it (0.99x -> 1.10x).
            min_prob=self.suffix.min_prob, chain=not self.tree, calibration=self.calibration,
        )  # fmt: skip
        return draft

    def observe(self, root: int, draft: Draft, logits: torch.Tensor) -> None:
        self.recycle.observe(root, draft, logits)

    def update(self, tokens, num_accepted, draft) -> None:
        # The suffix drafter keeps its text and the store's recency; calibration is ours.
        self.suffix.learn(tokens, num_accepted, draft, self._meta, self._propose_len, self.calibration)
        self._meta = []

    def shared(self) -> list[object]:
        return self.suffix.shared() + self.recycle.shared()

    def forget(self) -> None:
        self.suffix.forget()
        self.recycle.forget()

    def stats(self) -> dict:
        return {**self.suffix.stats(), **self.recycle.stats(), "recycled_steps": self._recycled_steps}
