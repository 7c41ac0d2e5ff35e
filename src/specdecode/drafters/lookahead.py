"""Lookahead decoding: Jacobi iteration guesses n-grams, the same forward verifies earlier ones.

(Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding", ICML
2024.) Two branches share every verification forward:

* The **lookahead branch**, a 2-D window of ``levels = ngram - 1`` rows of ``window`` guessed
  tokens. Row j is an older Jacobi iterate than row j + 1 and sits one position further right.
  Each token attends to the first row up to where its diagonal starts, then up its diagonal, so
  the whole window is a token *tree* (the parent of (j, c) is (j - 1, c - 1), and along row 0 the
  token to its left) and our tree verification runs it unchanged, positions and all. The target's
  predictions after the last row are the next iterate; each diagonal read through that new token
  is an n-gram the target "would have" produced, and goes into the pool. The rows then move up.
* The **verification branch**: up to ``guesses`` n-grams from the pool that start with the last
  accepted token, merged into a trie below the root.

Both are verified by the ordinary rules, so the output is exact (lossless sampling too: every
node is a deterministic proposal). The pool is per request and starts with the prompt's n-grams
(``pool_from_prompt``, as in the authors' implementation).

Where it pays: the lookahead branch costs ``window * levels`` tokens of every forward and mostly
feeds the pool. On a GPU those extra tokens are nearly free; on a CPU, verification cost grows
with the block (8 tokens ~1.3x one, 32 ~2.5x), so keep the window small, or use it where prompt
lookup also works. Node order: the verification branch first (best first), then the window, so a
draft cut with ``Draft.head`` loses window nodes first (and the window keeps its old guesses
where it was cut).
"""

from __future__ import annotations

import random
from collections import OrderedDict

import torch

from ..draft import Draft
from ..errors import InvalidArgument
from .. import checks as opt
from .base import Drafter
from .trees import Calibration, accepted_path, grow_tree

POOL, WINDOW = 0, 1  # calibration context classes


class LookaheadDrafter(Drafter):
    name = "lookahead"

    def __init__(
        self,
        *,
        window: int = 3,
        ngram: int = 3,
        guesses: int = 2,
        pool_per_token: int = 8,
        pool_from_prompt: bool = True,
        seed: int = 0,
    ):
        self.window = opt.integer("window", window)
        self.ngram = opt.integer("ngram", ngram, 2)
        self.guesses = opt.integer("guesses", guesses, 0)
        self.pool_per_token = opt.integer("pool_per_token", pool_per_token)
        self.pool_from_prompt = opt.flag("pool_from_prompt", pool_from_prompt)
        self.levels = self.ngram - 1
        self.rng = random.Random(opt.integer("seed", seed, 0))
        self.default_draft_length = self.levels * (self.window + self.guesses)
        # The window: rows[j][i] is the token at column j + i (position root + 1 + j + i).
        self.rows: list[list[int]] = []
        # n-gram pool: first token -> its continuations (ngram - 1 tokens), most recent last.
        self.pool: dict[int, OrderedDict[tuple[int, ...], None]] = {}
        self.calibration = Calibration()
        self._window_nodes: dict[tuple[int, int], int] = {}  # (row, index) -> node of the last draft
        self._meta: list = []
        self._propose_len = 0
        self._pool_hits = 0
        self._window_hits = 0

    @classmethod
    def create(cls, target, **options) -> "LookaheadDrafter":
        if not target.supports_tree:
            raise InvalidArgument(
                "method", f"lookahead verifies a 2-D window as a token tree, which the {target.name!r} backend cannot; use backend='native'"
            )
        return cls(**options)

    # ---- the pool -------------------------------------------------------------------------------
    def _remember(self, gram: tuple[int, ...]) -> None:
        entries = self.pool.setdefault(gram[0], OrderedDict())
        entries[gram[1:]] = None
        entries.move_to_end(gram[1:])
        if len(entries) > self.pool_per_token:
            entries.popitem(last=False)

    def begin(self, prompt_ids: list[int]) -> None:
        self.pool = {}
        n = self.ngram
        if self.pool_from_prompt:
            for i in range(len(prompt_ids) - n + 1):
                self._remember(tuple(prompt_ids[i : i + n]))
        # The first guesses: tokens of the prompt (the paper starts from random ones).
        self.rows = [[self.rng.choice(prompt_ids) for _ in range(self.window)] for _ in range(self.levels)]
        self._window_nodes = {}
        self._meta = []
        self._pool_hits = self._window_hits = 0

    # ---- drafting ------------------------------------------------------------------------------
    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        self._propose_len = len(tokens)
        root = tokens[-1]
        # Verification branch: the pool's most recent n-grams after the root, as a trie.
        grams = list(self.pool.get(root, ()))[-self.guesses :][::-1] if self.guesses else []
        trie: dict = {}
        for g in grams:
            node = trie
            for t in g:
                node = node.setdefault(t, {})

        def children(node: dict, depth: int):
            # Raw estimate: the share of the branch's n-grams that go through the child.
            sizes = {t: _leaves(sub) for t, sub in node.items()}
            total = sum(sizes.values())
            return [(t, sizes[t] / (total + 1), POOL * 8 + min(depth, 7), sub) for t, sub in node.items()]

        draft, meta = grow_tree(
            children(trie, 0), lambda sub, tok: children(sub, 1), budget=max_tokens, max_depth=self.levels,
            calibration=self.calibration,
        )  # fmt: skip
        tokens_, parents, conf = draft.tokens, draft.parents, draft.confidence
        # Lookahead branch: row 0 is a chain from the root; (j, i) hangs below (j - 1, i).
        self._window_nodes = {}
        for j, row in enumerate(self.rows):
            for i, tok in enumerate(row):
                if len(tokens_) >= max_tokens:
                    break
                if j == 0:
                    parent = -1 if i == 0 else self._window_nodes.get((0, i - 1))
                else:
                    parent = self._window_nodes.get((j - 1, i))
                if parent is None:
                    continue  # its parent was cut
                self._window_nodes[(j, i)] = len(tokens_)
                tokens_.append(tok)
                parents.append(parent)
                c = self.calibration.estimate(0.05, WINDOW * 8)
                conf.append(c)
                meta.append((0.05, WINDOW * 8, None))
        self._meta = meta
        return Draft(tokens_, parents, None, conf)

    def observe(self, root: int, draft: Draft, logits: torch.Tensor) -> None:
        if not self.rows:
            return
        last = self.levels - 1
        nodes = {k: v for k, v in self._window_nodes.items() if v < len(draft)}
        wanted = [(i, nodes[(last, i)]) for i in range(self.window) if (last, i) in nodes]
        if not wanted:
            return  # the window was cut off this draft: it waits as it is
        predicted = logits[[v + 1 for _, v in wanted]].argmax(dim=-1).tolist()
        new_row = list(self.rows[last])  # old guesses stay where the window was cut
        for (i, _), tok in zip(wanted, predicted):
            # The diagonal that ends at (last, i) (one token per row, all at index i), continued
            # by the target's prediction for the column after it.
            self._remember(tuple(row[i] for row in self.rows) + (tok,))
            new_row[i] = tok
        # Move up: the oldest row goes and the new iterate becomes the last row. The window
        # moves one position right, so every token keeps its index in its row.
        self.rows = self.rows[1:] + [new_row]

    def update(self, tokens, num_accepted, draft) -> None:
        if len(draft) and self._meta:
            path = accepted_path(draft, tokens[self._propose_len : self._propose_len + num_accepted])
            self.calibration.learn(draft, self._meta, path)
            window = set(self._window_nodes.values())
            for n in path:
                if n in window:
                    self._window_hits += 1
                else:
                    self._pool_hits += 1
        self._meta = []

    def stats(self) -> dict:
        return {
            "pool_ngrams": sum(len(v) for v in self.pool.values()),
            "accepted_from_pool": self._pool_hits,
            "accepted_from_window": self._window_hits,
        }


def _leaves(node: dict) -> int:
    return 1 if not node else sum(_leaves(sub) for sub in node.values())
