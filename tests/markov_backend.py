"""A backend whose "model" is an order-2 Markov chain over a tiny vocabulary: next-token logits
are a fixed table indexed by the last two tokens of the context. It honours positions, tree
masks, ``keep`` and ``truncate`` like a real backend, costs next to nothing per forward, and
its exact distributions are known, which makes 10k-draw sampling tests cheap."""

from __future__ import annotations

import torch

from specdecode.backends.base import Backend


class MarkovBackend(Backend):
    name = "markov"
    supports_tree = True

    def __init__(self, vocab_size: int = 8, seed: int = 0, scale: float = 1.5, max_length: int = 512):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab_size, vocab_size, vocab_size, generator=g) * scale
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.cache: list[int] = []
        self.block: list[int] = []
        self.length = 0

    def next_logits(self, context: list[int]) -> torch.Tensor:
        a = context[-2] if len(context) > 1 else 0
        return self.table[a, context[-1]]

    def forward(self, input_ids, *, positions=None, tree_mask=None, skip=None, logits_rows=slice(None)):
        block = [int(t) for t in input_ids.tolist()]
        n = len(block)
        if self.length + n > self.max_length:
            raise ValueError("context overflow")
        mask = tree_mask if tree_mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
        rows = []
        for i in range(n):
            path = self.cache + [block[j] for j in range(n) if mask[i, j]]  # ancestors in order
            rows.append(self.next_logits(path))
        self.cache = self.cache + block
        self.block = block
        self.length += n
        if logits_rows is None:
            return None
        return torch.stack(rows)[logits_rows]

    def keep(self, start: int, rows: list[int]) -> None:
        kept = [self.cache[start + r] for r in rows]
        self.cache = self.cache[:start] + kept
        self.length = len(self.cache)

    def _truncate(self, length: int) -> None:
        self.cache = self.cache[:length]
        self.length = length


class CharTokenizer:
    """Enough of a tokenizer for the engine's text output."""

    name_or_path = ""
    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i) for i in ids)
