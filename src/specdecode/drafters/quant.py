"""Quantized self-drafting: the target drafts through a weight-only int4/int8 copy of itself.

At load, the target's decoder-layer linears are quantized (``backends/quant.py``: int4 group-wise
or int8 per channel, round to nearest; no second model, no training, no download). Drafting runs
the target's own forward with the quantized linears in place of its own; verification runs the
full-precision target, so the output is exactly the target's.

A CPU decodes at the speed it reads weights, and int4 weights are a quarter of bf16's bytes (plus
the scales), so a draft token costs a fraction of a target forward, while the quantized model
picks the model's own next token nearly always: drafts are cheap and long chains get accepted.

Cache: by default the draft attends to the target's own KV cache for the verified prefix, as
SWIFT's drafts do: the prefix's keys and values are the full-precision model's (the draft sees
the context exactly as the target does, so it agrees more often), there is no second prefill and
no second cache. The draft's own tokens are written after the prefix and rolled back; the
verification forward rewrites every layer. ``cache="own"`` keeps a separate cache computed by the
quantized model (as a separate draft model would; measured slower, see BENCHMARKS.md).

Drafts: a chain of the quantized model's argmax (greedy) or of samples from its distribution q
under the request's sampling settings (``Draft.probs`` = q, so verification accepts with
min(1, p/q)). Where the draft is unsure, ``branches`` adds sibling candidates (a token tree, as
SWIFT's: the next-best tokens under greedy; under sampling, further samples drawn without
replacement, each with its own distribution, which keeps recursive rejection sampling exact).
Greedy: each node's ``Draft.confidence`` is the draft model's probability of its token, and
nodes are ordered best-first (by the probability of their whole path; parents before children),
so any ``draft.head(k)`` is the best k-node tree. Sampling: which nodes are verified, and in
what order siblings are tried, must not depend on the sampled tokens themselves (a token kept
only when likely is no longer distributed as q, and a sibling drawn without replacement is
distributed as its q only after the siblings drawn before it); so siblings keep their drawing
order, the list is the chain first, then the siblings depth by depth, and no confidence is
given (a token drawn from q is accepted with probability min(1, p/q), which its q does not
estimate). Drafting stops when the drafted path's probability falls below ``stop_below``: a
further draft forward would most likely be wasted (a decision on tokens already drafted, which
only decides whether their children are drafted: lossless).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from ..backends import Backend
from ..backends.quant import QuantConfig
from ..draft import Draft
from ..errors import InvalidArgument
from ..sampling import probabilities, sample
from .base import Drafter
from .swift import _flag, _fraction, _positive

CACHES = ("shared", "own")


def _branches(value) -> tuple[int, ...]:
    try:
        out = tuple(value)
    except TypeError:
        out = ()
    if len(out) != 4 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in out):
        raise InvalidArgument(
            "branches", f"expected 4 positive integers (candidates at top-1 probability >0.95, >0.8, >0.5, else), got {value!r}"
        )
    return out


class QuantDrafter(Drafter):
    name = "quant"
    default_draft_length = 10  # most nodes per step; drafting usually stops earlier (stop_below)
    default_adaptive = False

    def __init__(
        self,
        target: Backend,
        *,
        bits: int = 4,
        group_size: int | None = None,
        keep_layers=(),
        quantize_lm_head: bool = True,  # a draft only proposes: int4 lm_head, same agreement, ~18% cheaper (Qwen-1.5B)
        cache: str = "shared",
        branches=(1, 1, 1, 1),
        stop_below: float = 0.3,
        max_depth: int = 16,
    ):
        if not target.supports_self_draft:
            raise InvalidArgument("method", f"quant drafts through the native backend's layers, not the {target.name!r} backend's; use backend='native'")
        if cache not in CACHES:
            raise InvalidArgument("cache", f"expected one of {', '.join(CACHES)}, got {cache!r}")
        self.target = target
        self.config = QuantConfig.make(bits, group_size, keep_layers, _flag("quantize_lm_head", quantize_lm_head))
        self.branches = _branches(branches)
        self.stop_below = _fraction("stop_below", stop_below, open_interval=False)
        self.max_depth = _positive("max_depth", max_depth)
        self.weights = target.quantized_weights(self.config)
        self.cache = cache
        # cache="own": the target's embedding, norms and RoPE tables with the quantized linears
        # and a cache of its own, a separate quantized model in all but the memory of the shared parts.
        self.own: Backend | None = target.twin(self.weights) if cache == "own" else None
        self._cached: list[int] = []  # own cache: the tokens whose keys/values it holds
        self._forwards = 0  # draft forwards in this request

    @classmethod
    def create(cls, target, **options) -> "QuantDrafter":
        return cls(target, **options)

    def fork(self, target=None) -> "QuantDrafter":
        """A drafter for one request of a batch: the same quantized copy, drafting over that
        request's own cache (``target``: the target over its slot), and its own cache where
        ``cache="own"``."""
        twin = copy.copy(self)
        twin.target = self.target if target is None else target
        twin.own = twin.target.twin(self.weights) if self.cache == "own" else None
        twin._cached, twin._forwards = [], 0
        return twin

    def begin(self, prompt_ids):
        self._forwards = 0
        if self.own is not None:
            self.own.reset()
            self._cached = []

    def _width(self, top: float) -> int:
        for bound, k in zip((0.95, 0.8, 0.5), self.branches):
            if top > bound:
                return k
        return self.branches[3]

    # ---- drafting -------------------------------------------------------------------------------
    def _sync(self, tokens: list[int]) -> list[int]:
        """Own cache: roll back to the longest prefix shared with ``tokens``; the tokens to feed
        (at least the last one, for its logits)."""
        common = 0
        limit = min(len(self._cached), len(tokens) - 1)
        while common < limit and self._cached[common] == tokens[common]:
            common += 1
        self.own.truncate(common)
        del self._cached[common:]
        return tokens[common:]

    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        model = self.target if self.own is None else self.own
        depth = min(self.max_depth, max_tokens, model.max_length - len(tokens))
        if depth <= 0:
            return Draft()
        return self._draft(tokens, max_tokens, depth, params, generator)

    @torch.inference_mode()
    def _draft(self, tokens, max_tokens, depth, params, generator) -> Draft:
        shared = self.own is None
        # Shared: the quantized linears over the target's cache, whose draft rows are dropped at
        # the end. Own: the twin's cache keeps what it computed, to be reused next step.
        model, weights = (self.target, self.weights) if shared else (self.own, None)
        feed = [tokens[-1]] if shared else self._sync(tokens)
        # Nodes as (path probability, token, parent node, confidence, distribution).
        nodes: list[tuple[float, int, int, float, torch.Tensor | None]] = []
        parent, path = -1, 1.0
        with self.target.self_draft() if shared else contextlib.nullcontext():
            for _ in range(depth):
                logits = model.draft_forward(torch.tensor(feed), logits_rows=slice(-1, None), weights=weights)[0]
                self._forwards += 1
                if not shared:
                    self._cached.extend(feed)
                first = len(nodes)
                if params.greedy:
                    probs = logits.softmax(-1)
                    top = torch.topk(probs, min(max(self.branches), probs.shape[-1]))
                    values, ids = top.values.tolist(), top.indices.tolist()
                    for v, t in list(zip(values, ids))[: self._width(values[0])]:
                        nodes.append((path * v, t, parent, v, None))
                else:
                    q = probabilities(logits, params)
                    width, left = self._width(float(q.max())), q
                    for _ in range(width):
                        t = sample(left, generator)
                        v = float(q[t])
                        nodes.append((path * v, t, parent, v, left))
                        left = left.clone()
                        left[t] = 0
                        total = float(left.sum())
                        if total <= 0:  # nothing else can be drawn (top-k / top-p)
                            break
                        left /= total
                parent = first  # the first candidate (argmax, or the first sample) leads on
                path, token = nodes[first][0], nodes[first][1]
                if path < self.stop_below:
                    break
                feed = [token]
        if params.greedy:
            order = sorted(range(len(nodes)), key=lambda i: (-nodes[i][0], i))
        else:
            spine = {parent}
            while nodes[min(spine)][2] >= 0:
                spine.add(nodes[min(spine)][2])
            order = sorted(spine) + [i for i in range(len(nodes)) if i not in spine]
        return self._in_order(nodes, order[:max_tokens], params.greedy)

    @staticmethod
    def _in_order(nodes, order: list[int], greedy: bool) -> Draft:
        """The nodes listed in ``order``, which puts every node after its parent (greedy: by
        path probability, as a child's path is no more probable than its parent's and ties keep
        the drafting order; sampling: the chain's nodes first, in depth order)."""
        where = {old: new for new, old in enumerate(order)}
        assert all(nodes[i][2] < 0 or where.get(nodes[i][2], len(order)) < where[i] for i in order)
        return Draft(
            tokens=[nodes[i][1] for i in order],
            parents=[where[nodes[i][2]] if nodes[i][2] >= 0 else -1 for i in order],
            probs=None if greedy else [nodes[i][4] for i in order],
            confidence=[nodes[i][3] for i in order] if greedy else None,
        )

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes + (0 if self.own is None else self.own.cache_bytes)

    def stats(self) -> dict:
        own_bytes = 0 if self.own is None else self.own.cache_bytes
        return {
            "quant": self.config.label,
            "quant_cache": self.cache,
            "quant_bytes": self.weights.nbytes,  # memory the quantized copy adds
            "own_cache_bytes": own_bytes,
            "draft_forwards": self._forwards,
        }
