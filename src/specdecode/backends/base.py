"""The interface every model backend offers to the decoding loop.

A backend owns one model and one KV cache for a single sequence (batch size 1: speculative
decoding is a latency technique). The cache holds ``length`` tokens. ``forward`` appends a block
of tokens after them and returns logits; ``truncate`` rolls the cache back (a rejected draft);
``keep`` compacts chosen slots of the last block to the front of it (the accepted path of a tree).

Self-drafting (``supports_self_draft``; SWIFT and quant use it): the target drafts for itself
in a cheaper form — some sub-layers skipped, or quantized copies of its linears — over its own
cache. Inside ``self_draft()`` the draft's rows go after the verified prefix, whose keys and
values are the target's own (no second prefill, no second cache), and leaving forgets them:
the verification forward rewrites every layer of those positions anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
    supports_self_draft: bool = False  # the self-drafting interface below
    supports_hidden: bool = False  # forward(hidden_layers=...) hands back hidden states
    length: int = 0

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        skip: SkipSet | None = None,
        logits_rows: torch.Tensor | slice | None = slice(None),
        hidden_layers: tuple[int, ...] | None = None,
    ):
        """Append ``input_ids`` ([T]) to the cache and return logits ([len(rows), vocab], float32).

        positions: [T] position ids; default ``length + arange(T)``.
        tree_mask: [T, T] bool; ``tree_mask[i, j]`` says block token i may attend to block token
            j (its ancestors and itself). Default: causal. Tokens always see the whole cache.
        skip: sub-layers to skip (only where ``supports_skip``).
        logits_rows: which of the T rows need logits; ``None`` computes none (prefill).
        hidden_layers: where ``supports_hidden``, also return the block's hidden states, as
            ``(logits, hidden)`` with hidden [T, len(hidden_layers), D] in the model's dtype;
            numbered as transformers' ``output_hidden_states`` (i < num_layers: the input of
            decoder layer i; num_layers: the last layer's output after the final norm). The
            trained drafters read them: the verification forward's by-product, no extra forward.
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

    # ---- self-drafting (see the module docstring) -----------------------------------------------
    @property
    def num_layers(self) -> int:
        """Decoder layers (a skip set names them 0 .. num_layers - 1)."""
        raise NotImplementedError(f"backend {self.name!r} does not expose its layers")

    def fingerprint(self) -> dict:
        """What a tuned self-drafting setting (a saved skip set) must agree with to be used on
        this model."""
        raise NotImplementedError(f"backend {self.name!r} cannot draft for itself")

    @contextmanager
    def self_draft(self) -> Iterator[None]:
        """Draft on the target's own cache: ``draft_forward`` calls inside append their rows
        after the verified prefix, and leaving rolls the cache back to that prefix (a pointer
        moves; nothing is copied or cleared)."""
        start = self.length
        try:
            yield
        finally:
            self.truncate(start)

    def draft_forward(
        self,
        input_ids: torch.Tensor,
        *,
        skip: SkipSet | None = None,
        weights=None,
        positions: torch.Tensor | None = None,
        context: int | None = None,
        logits_rows: torch.Tensor | slice | None = slice(None),
    ) -> torch.Tensor | None:
        """``forward`` in drafting form, appended to the cache alike: ``skip`` sub-layers skipped;
        ``weights`` (from ``quantized_weights``) in place of the model's own linears; ``context``
        limits what the block sees of the cache to its first ``context`` tokens (scoring a
        drafting form on text already decoded, right after the prompt)."""
        raise NotImplementedError(f"backend {self.name!r} cannot draft for itself")

    def quantized_weights(self, config):
        """A weight-only quantized copy of the model's linears (``quant.QuantConfig``), for
        ``draft_forward(weights=)``; norms and embedding stay shared."""
        raise NotImplementedError(f"backend {self.name!r} cannot draft for itself")

    def twin(self, weights) -> "Backend":
        """A model sharing this one's embedding, norms and position tables, with ``weights``'
        linears and a KV cache of its own: a separate draft model in all but the memory of the
        shared parts (quant's ``cache="own"``)."""
        raise NotImplementedError(f"backend {self.name!r} cannot draft for itself")

    @property
    def cache_bytes(self) -> int:
        """Bytes the KV cache holds."""
        return 0
