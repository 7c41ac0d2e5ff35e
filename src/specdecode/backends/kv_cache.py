"""One sequence's keys and values, every layer, grown in blocks as the sequence lengthens.

A cache used to be preallocated for the model's whole context (32,768 positions for Qwen2.5:
~0.9 GB for the 1.5B, whatever the request needed). This one starts at one block and, when a
forward needs room past its capacity, moves into a buffer of at least twice the size (rounded to
whole blocks, at most ``max_length``): a sequence of n tokens holds less than 2n positions and is
copied O(log n) times. Rolling back (a rejected draft) only moves ``length``; rows past it are
garbage that the next forward overwrites before anything reads them.
"""

from __future__ import annotations

import torch

BLOCK = 256  # positions; the first allocation and the granularity of growth


class KVCache:
    """Keys and values [num_layers, num_kv_heads, capacity, head_dim] of one sequence."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int, *,
                 dtype: torch.dtype, device: torch.device, block: int = BLOCK):  # fmt: skip
        self.max_length, self.block = max_length, block
        self._shape = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.length = 0
        self.k = self.v = torch.empty(0)
        self._allocate(min(block, max_length))

    @torch.inference_mode(False)
    def _allocate(self, capacity: int) -> None:
        # Ordinary tensors even when a forward (in inference mode) grows the cache: rolling a
        # tree's path into place (``keep``) edits them outside inference mode.
        layers, heads, hd = self._shape
        # Uninitialised: rows are read only after a forward wrote them (``length`` says how many).
        k = torch.empty((layers, heads, capacity, hd), dtype=self.dtype, device=self.device)
        v = torch.empty((layers, heads, capacity, hd), dtype=self.dtype, device=self.device)
        if self.length:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, end: int) -> None:
        """Make room for positions up to ``end`` (exclusive), keeping the first ``length``."""
        if end <= self.capacity:
            return
        if end > self.max_length:
            raise ValueError(f"context overflow: {end} tokens > {self.max_length}")
        want = max(end, 2 * self.capacity)
        self._allocate(min(self.max_length, -(-want // self.block) * self.block))

    def keep(self, start: int, rows: list[int]) -> None:
        """Block rows ``rows`` (offsets from ``start``, increasing) become the tokens right after
        ``start`` (a tree's accepted path); the length becomes ``start + len(rows)``."""
        if rows != list(range(len(rows))):
            src = torch.tensor(rows, device=self.device) + start
            dst = slice(start, start + len(rows))
            self.k[:, :, dst] = self.k[:, :, src]
            self.v[:, :, dst] = self.v[:, :, src]
        self.length = start + len(rows)

    def release(self) -> None:
        """Forget the sequence and give the memory back (down to one block)."""
        self.length = 0
        if self.capacity > self.block:
            self._allocate(min(self.block, self.max_length))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def bytes_per_token(self) -> int:
        """What one position costs, keys and values of every layer."""
        layers, heads, hd = self._shape
        return 2 * layers * heads * hd * self.dtype.itemsize
