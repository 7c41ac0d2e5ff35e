"""Drafting with a trained head over the target's hidden states: ``eagle`` (EAGLE-3 and EAGLE-1/2
heads, a dynamic tree as EAGLE-2 grows it), ``specdec`` (SpecDec's drafter: a block of tokens per
head forward) and ``medusa`` (Medusa-1's heads). The heads themselves are in ``heads/``.

Where the features come from: the target's hidden states for every token that enters its cache,
handed over by the decoding step (``observe_hidden``: the prompt's from the prefill, the
accepted path's from each verification forward), so drafting costs no target forward. An
EAGLE head keeps a KV cache of its own over the pairs (feature of position i, token i + 1),
i < len(cache); drafting appends tree rows after them and rolls them back.

Every proposal is verified by the target like any draft: greedy output is the target's own,
and sampled drafts are proposed deterministically (the top-k of the head), so that speculative
sampling treats them as one-hot proposals and the output keeps the target's distribution.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..draft import Draft
from ..errors import InvalidArgument
from ..heads.model import EagleHead, MedusaHead, attend
from ..checks import integer
from .base import Drafter
from .trees import grow_tree


class HeadCache:
    """An EAGLE head's keys and values [KV, length, hd], grown as the sequence lengthens."""

    def __init__(self, kv: int, hd: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.empty(kv, 0, hd, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[1]
        if self.length + n > self.k.shape[1]:
            grow = max(self.length + n, 2 * self.k.shape[1], 64)
            k2 = self.k.new_empty(self.k.shape[0], grow, self.k.shape[2])
            v2 = torch.empty_like(k2)
            k2[:, : self.length], v2[:, : self.length] = self.k[:, : self.length], self.v[:, : self.length]
            self.k, self.v = k2, v2
        self.k[:, self.length : self.length + n] = k
        self.v[:, self.length : self.length + n] = v
        self.length += n

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class HeadDrafter(Drafter):
    """What the three share: the head, the target features it has been handed."""

    default_draft_length = 8
    default_adaptive = True
    kinds: tuple[str, ...] = ()  # head kinds this drafter drafts with (heads/model.py)

    @classmethod
    def create(cls, target, *, drafter: str | None = None, model_name: str = "", **options) -> "HeadDrafter":
        """Load the head in folder ``drafter`` (default: the one cached for ``model_name``,
        ``specdecode train-drafter``'s output) for ``target``."""
        from ..heads.store import cached_head, drafters_dir, load_head

        if not getattr(target, "supports_hidden", False):
            raise InvalidArgument("method", f"method {cls.name!r} reads the target's hidden states, which the "
                                  f"{target.name!r} backend does not hand over")  # fmt: skip
        if drafter is None:
            folder = cached_head(model_name, cls.kinds)
            if folder is None:
                raise InvalidArgument(
                    "drafter", f"method {cls.name!r} needs a trained head: none is cached for model {model_name!r} "
                    f"(in {drafters_dir() / model_name}/{'|'.join(cls.kinds)}); train one with `specdecode train-drafter "
                    f"--model {model_name} --kind {cls.kinds[0]}` or pass -o drafter=DIR"
                )  # fmt: skip
        else:
            folder = Path(str(drafter)).expanduser()
        head = load_head(folder, target)
        if head.cfg.kind not in cls.kinds:
            raise InvalidArgument("drafter", f"method {cls.name!r} drafts with a {'/'.join(cls.kinds)} head; "
                                  f"{str(folder)!r} holds a {head.cfg.kind} head")  # fmt: skip
        return cls(head, source=str(folder), **options)

    def __init__(self, head, source: str = ""):
        self.head = head
        self.source = source  # where the head was loaded from (doctor, stats)
        self.hidden_layers = tuple(head.cfg.target_layers)
        p = next(head.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.feats = torch.empty(0, head.cfg.hidden_size, dtype=self.dtype, device=self.device)

    def shared(self) -> list[object]:
        return [self.head]

    def begin(self, prompt_ids: list[int]) -> None:
        self.feats = self.feats[:0]

    @torch.inference_mode()
    def observe_hidden(self, hidden: torch.Tensor) -> None:
        feats = self.head.fuse(hidden.to(self.device, self.dtype))
        self.feats = torch.cat((self.feats, feats))

    def _check_features(self, tokens: list[int]) -> None:
        if self.feats.shape[0] != len(tokens) - 1:
            raise RuntimeError(
                f"{self.name}: the head holds features for {self.feats.shape[0]} tokens, the target's cache "
                f"{len(tokens) - 1}: the decoding step must hand it the target's hidden states (hidden_layers)"
            )

    @property
    def nbytes(self) -> int:
        own = sum(p.nbytes for p in self.head.parameters()) + sum(b.nbytes for b in self.head.buffers())
        return own + self.feats.nbytes

    def _top(self, logits: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
        """The ``k`` most likely target ids of a draft-vocabulary row and their probabilities."""
        probs = logits.float().softmax(-1)
        top = probs.topk(min(k, probs.shape[-1]))
        return self.head.to_target_ids(top.indices).tolist(), top.values.tolist()


class EagleDrafter(HeadDrafter):
    """``eagle`` (eagle3 and eagle1 heads) and ``specdec`` heads."""

    name = "eagle"
    kinds = ("eagle3", "eagle1")

    def __init__(self, head: EagleHead, *, depth: int = 8, width: int = 4, topk: int = 4, tree: bool = True,
                 source: str = ""):  # fmt: skip
        super().__init__(head, source)
        self.depth = integer("depth", depth)
        self.width = integer("width", width)
        self.topk = integer("topk", topk)
        if not tree:
            self.width = self.topk = 1
        cfg = head.cfg
        self.cache = HeadCache(cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device)
        self.last_out: torch.Tensor | None = None  # the layer's output for the last pair fed

    def begin(self, prompt_ids):
        super().begin(prompt_ids)
        self.cache.length = 0
        self.last_out = None

    def fork(self, target=None) -> "EagleDrafter":
        twin = super().fork(target)
        cfg = self.head.cfg
        twin.cache = HeadCache(cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device)
        return twin

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.cache.nbytes

    def _rows(self, emb: torch.Tensor, feat: torch.Tensor, positions: list[int], mask: torch.Tensor) -> torch.Tensor:
        """Run the head's layer over new rows appended to its cache; ``mask`` [rows, cache +
        rows] says what each row sees. Returns the layer's outputs [rows, H]."""
        head = self.head
        cos, sin = head.rope(torch.tensor(positions, device=self.device), self.dtype)
        emb, x = head.inputs(emb, feat)
        q, k, v, residual = head.layer.project(emb, x, cos, sin)
        self.cache.append(k, v)
        n = self.cache.length
        attn = attend(q, self.cache.k[:, :n], self.cache.v[:, :n], mask.to(self.device))
        return head.layer.finish(attn, residual)

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Bring the head's cache up to the target's (pairs 0 .. len(tokens) - 2) and return the
        output of the last pair: it predicts the token after ``tokens``."""
        m, start = len(tokens) - 1, self.cache.length
        if start < m:
            ids = torch.tensor(tokens[start + 1 : m + 1], device=self.device)
            n = m - start
            mask = torch.ones(n, m, dtype=torch.bool).tril(diagonal=start)
            out = self._rows(self.head.embed_tokens(ids), self.feats[start:m], list(range(start, m)), mask)
            self.last_out = out[-1]
        return self.last_out

    @torch.inference_mode()
    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        self._check_features(tokens)
        if len(tokens) < 2:
            return Draft()
        root_out = self._feed(tokens)
        m = self.cache.length
        try:
            if self.head.cfg.kind == "specdec":
                return self._block(root_out, m, max_tokens)
            return self._tree(root_out, m, max_tokens)
        finally:
            self.cache.length = m  # the tree rows are forgotten

    def _tree(self, root_out: torch.Tensor, m: int, budget: int) -> Draft:
        """EAGLE-2's dynamic tree: expand the ``width`` best nodes of each depth (by the product
        of the head's probabilities along their path) with their ``topk`` children, then keep
        the ``budget`` best nodes overall (parents before children)."""
        head = self.head
        tokens, parents, probs, scores, depth_of = [], [], [], [], []
        slot_of: dict[int, int] = {}  # expanded node -> its row in the head's cache
        outs: dict[int, torch.Tensor] = {-1: root_out}

        def add_children(parent: int, logits: torch.Tensor) -> list[int]:
            ids, ps = self._top(logits, self.topk)
            base = scores[parent] if parent >= 0 else 1.0
            new = []
            for tok, p in zip(ids, ps):
                tokens.append(tok)
                parents.append(parent)
                probs.append(p)
                scores.append(base * p)
                depth_of.append(1 if parent < 0 else depth_of[parent] + 1)
                new.append(len(tokens) - 1)
            return new

        frontier = add_children(-1, head.logits(root_out))
        for _ in range(1, min(self.depth, budget)):
            chosen = sorted(frontier, key=lambda i: -scores[i])[: self.width]
            # A node whose path is already less likely than the budget-th best cannot be kept.
            if len(tokens) >= budget:
                floor = sorted(scores, reverse=True)[budget - 1]
                chosen = [i for i in chosen if scores[i] > floor]
            if not chosen:
                break
            base = self.cache.length
            mask = torch.zeros(len(chosen), base + len(chosen), dtype=torch.bool)
            mask[:, :m] = True
            for r, node in enumerate(chosen):
                anc = parents[node]
                while anc >= 0:
                    mask[r, slot_of[anc]] = True
                    anc = parents[anc]
                mask[r, base + r] = True
                slot_of[node] = base + r
            ids = torch.tensor([tokens[i] for i in chosen], device=self.device)
            feat = torch.stack([outs[parents[i]] for i in chosen])
            positions = [m - 1 + depth_of[i] for i in chosen]
            out = self._rows(head.embed_tokens(ids), feat, positions, mask)
            lg = head.logits(out)
            frontier = []
            for r, node in enumerate(chosen):
                outs[node] = out[r]
                frontier += add_children(node, lg[r])
        return _best(tokens, parents, probs, scores, depth_of, budget)

    def _block(self, root_out: torch.Tensor, m: int, budget: int) -> Draft:
        """SpecDec's drafter: the k - 1 [MASK] rows after the last pair give the distributions of
        the tokens 2..k ahead in one forward; a tree of their top candidates, best first."""
        head = self.head
        k = min(head.cfg.blocks, budget, self.depth)
        dists = [head.logits(root_out)]
        if k > 1:
            n = k - 1
            emb = head.mask_embed[: n].to(self.dtype)
            if emb.shape[0] < n:
                emb = torch.cat([emb, emb[-1:].expand(n - emb.shape[0], -1)])
            feat = head.mask_feature.to(self.dtype).expand(n, -1)
            mask = torch.ones(n, m + n, dtype=torch.bool).tril(diagonal=m)
            out = self._rows(emb, feat, list(range(m, m + n)), mask)
            dists += list(head.logits(out))
        tops = [self._top(d, self.topk) for d in dists]
        return _product_tree(tops, budget, self.width)


class SpecDecDrafter(EagleDrafter):
    """SpecDec's drafter: a block of tokens per head forward (``EagleDrafter._block``)."""

    name = "specdec-drafter"
    kinds = ("specdec",)


class MedusaDrafter(HeadDrafter):
    """Medusa-1: the heads read the target's last hidden state (of the last cached token) once;
    the tree of their top candidates is grown best first."""

    name = "medusa"
    kinds = ("medusa",)

    def __init__(self, head: MedusaHead, *, topk: int = 4, width: int = 4, tree: bool = True, source: str = ""):
        super().__init__(head, source)
        self.topk = integer("topk", topk)
        self.width = integer("width", width)
        if not tree:
            self.topk = self.width = 1
        self.count = 0  # the target's hidden states seen this request (only the last is kept)

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        self.feats = self.head.fuse(hidden[-1:].to(self.device, self.dtype))
        self.count += hidden.shape[0]

    def begin(self, prompt_ids):
        super().begin(prompt_ids)
        self.count = 0

    def _check_features(self, tokens):
        if self.count != len(tokens) - 1:
            raise RuntimeError(f"medusa: the head saw the hidden states of {self.count} tokens, the target's "
                               f"cache holds {len(tokens) - 1}")  # fmt: skip

    @torch.inference_mode()
    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        self._check_features(tokens)
        if len(tokens) < 2:
            return Draft()
        logits = self.head(self.feats[-1])
        tops = [self._top(lg, self.topk) for lg in logits]
        return _product_tree(tops, max_tokens, self.width)


def _best(tokens, parents, probs, scores, depth_of, budget) -> Draft:
    """The ``budget`` best nodes by path probability, parents first (a child's path is never
    more likely than its parent's; ties go to the shallower)."""
    order = sorted(range(len(tokens)), key=lambda i: (-scores[i], depth_of[i]))[:budget]
    index = {old: new for new, old in enumerate(order)}
    return Draft(
        [tokens[i] for i in order], [index[parents[i]] if parents[i] >= 0 else -1 for i in order],
        None, [probs[i] for i in order],
    )  # fmt: skip


def _product_tree(tops: list[tuple[list[int], list[float]]], budget: int, width: int) -> Draft:
    """A tree over per-depth candidate lists (independent distributions), best first by the
    product of probabilities; at most ``width`` children per node beyond the best."""

    def expand(depth, _tok):
        if depth >= len(tops):
            return []
        ids, ps = tops[depth]
        return [(t, p, 0, depth + 1) for t, p in list(zip(ids, ps))[:width]]

    draft, _ = grow_tree(expand(0, None), expand, budget=budget, max_depth=len(tops))
    return draft


