"""The interface every model backend offers to the decoding loop.

A backend owns one model and one KV cache for a single sequence (batch size 1: speculative
decoding is a latency technique). The cache holds ``length`` tokens. ``forward`` appends a block
of tokens after them and returns logits; ``truncate`` rolls the cache back (a rejected draft);
``keep`` compacts chosen slots of the last block to the front of it (the accepted path of a tree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SkipSet:
    """Sub-layers to skip in a forward pass (self-speculative drafting, e.g. SWIFT).

    Attention and MLP sub-layers are counted separately: ``attention`` and ``mlp`` hold layer
    indices whose sub-layer is replaced by the identity (the residual stream passes through).
    """

    attention: frozenset[int] = field(default_factory=frozenset)
    mlp: frozenset[int] = field(default_factory=frozenset)

    def __bool__(self) -> bool:
        return bool(self.attention or self.mlp)


class Backend:
    """Base class; see the module docstring. Subclasses set the attributes below."""

    name: str = "base"
    vocab_size: int
    max_length: int  # tokens the cache (and the model's positions) can hold
    device: torch.device
    dtype: torch.dtype
    supports_tree: bool = False
    supports_skip: bool = False
    length: int = 0

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        skip: SkipSet | None = None,
        logits_rows: torch.Tensor | slice | None = slice(None),
    ) -> torch.Tensor | None:
        """Append ``input_ids`` ([T]) to the cache and return logits ([len(rows), vocab], float32).

        positions: [T] position ids; default ``length + arange(T)``.
        tree_mask: [T, T] bool; ``tree_mask[i, j]`` says block token i may attend to block token
            j (its ancestors and itself). Default: causal. Tokens always see the whole cache.
        skip: sub-layers to skip (only where ``supports_skip``).
        logits_rows: which of the T rows need logits; ``None`` computes none (prefill).
        """
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` cached tokens."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self._truncate(length)

    def _truncate(self, length: int) -> None:
        """``truncate`` after its bounds check."""
        raise NotImplementedError

    def keep(self, start: int, rows: list[int]) -> None:
        """Keep block rows ``rows`` (offsets from ``start``) as the tokens right after ``start``.

        Used after tree verification: the accepted path's cache entries move into place and the
        cache length becomes ``start + len(rows)``. Rows must be increasing.
        """
        if rows == list(range(len(rows))):
            self.truncate(start + len(rows))
            return
        raise NotImplementedError(f"backend {self.name!r} cannot compact a tree path")

    def reset(self) -> None:
        self.truncate(0)
