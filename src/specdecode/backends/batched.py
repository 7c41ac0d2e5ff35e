"""A KV cache of many sequences over a native model, and one forward for all of them.

Continuous batching (``batching.py``) runs several requests at once: each holds a *slot*, a
private KV cache with its own length, and every step runs ONE forward over a flattened ragged
block in which each sequence contributes its own segment: a decoding step's root token and its
draft (a chain or a tree, with per-token positions and a tree mask), or a chunk of its prompt.
A token attends only to its own slot's cache and to the tokens of its own segment that its
tree mask allows. The weights are the native backend's own (``NativeBackend``'s layers, shared,
not copied); only the caches are new.

Exactness. A segment is computed as ``NativeBackend.forward`` computes the same block alone:

* segments of up to ``ROWWISE_MAX_BLOCK`` tokens (decoding steps, verification blocks, short
  prefill chunks) attend row by row (``kernels.attention_rowwise``), and their rows go through
  the linears together, cut into chunks the row-invariance check vouched for (``max_rows``
  rows, short chunks padded to ``pad_rows``). Where that check made a linear exact (bf16 on
  CPU), a row's output is bit for bit what the lone forward gives it, whatever its neighbours;
* longer segments (prefill chunks) get their own linear products and masked attention, as a
  lone prefill of the same chunk does.

In float32 CPU kernels are not row-invariant: rows then agree with the lone forward up to
float32 rounding, as a lone verification block agrees with plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidArgument
from ..checks import integer
from .invariance import ROWWISE_MAX_BLOCK
from .kernels import attention, attention_mask, attention_rowwise, rms_norm, rotate, row_plans, stack_hidden
from .native import NativeBackend


@dataclass
class Segment:
    """One sequence's part of a batched forward.

    ids: [n] tokens appended to ``slot``'s cache. positions: [n] position ids (default: the
    slot's length + arange(n)). tree_mask: [n, n] bool over the segment (default causal).
    logits: whether to return logits for the segment's rows (a prefill chunk needs none).
    """

    slot: int
    ids: torch.Tensor
    positions: torch.Tensor | None = None
    tree_mask: torch.Tensor | None = None
    logits: bool = True


class BatchedCache:
    """Slots of KV cache over a ``NativeBackend``'s weights; see the module docstring."""

    def __init__(self, target, num_slots: int, *, max_length: int | None = None):
        if not isinstance(target, NativeBackend):
            name = getattr(target, "name", type(target).__name__)
            raise InvalidArgument(
                "backend", f"batched generation runs on the native backend; this engine's target is {name!r} "
                "(load the model with backend='native'; the hf backend decodes one sequence at a time)"
            )  # fmt: skip
        integer("max_num_seqs", num_slots)
        self.target = target
        self.device, self.dtype, self.vocab_size = target.device, target.dtype, target.vocab_size
        self.max_length = min(max_length or target.max_length, target.max_length)
        self.num_slots = num_slots
        # A KV cache per slot, each grown as its sequence lengthens and given back when the
        # slot is released: nothing is held for positions no request reached.
        self.caches = [target.new_cache(self.max_length) for _ in range(num_slots)]
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def lengths(self) -> list[int]:
        return [c.length for c in self.caches]

    @property
    def nbytes(self) -> int:
        """Bytes the slots' caches hold now."""
        return sum(c.nbytes for c in self.caches)

    # ---- slots --------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free slot")
        slot = self._free.pop()
        self.caches[slot].length = 0
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free:
            raise RuntimeError(f"slot {slot} is not in use")
        self.caches[slot].release()
        self._free.append(slot)

    def truncate(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.caches[slot].length:
            raise ValueError(f"cannot truncate slot {slot} of {self.caches[slot].length} tokens to {length}")
        self.caches[slot].length = length

    def keep(self, slot: int, start: int, rows: list[int]) -> None:
        """As ``Backend.keep``, for one slot: block rows ``rows`` (offsets from ``start``) become
        the tokens right after ``start``."""
        cache = self.caches[slot]
        if start + (max(rows) + 1 if rows else 0) > cache.length:
            raise ValueError(f"slot {slot} holds {cache.length} tokens; cannot keep rows {rows} after {start}")
        cache.keep(start, rows)

    def view(self, slot: int) -> NativeBackend:
        """The target over ``slot``'s cache alone: a one-sequence backend for a drafter that
        drafts through the target (quant, swift) on a request's own tokens."""
        return self.target.with_cache(self.caches[slot])

    # ---- forward ------------------------------------------------------------------------------
    @staticmethod
    def _linear(lin, x: torch.Tensor, groups: list[tuple[list[int] | slice, bool]]) -> torch.Tensor:
        """``lin`` over rows of ``x`` as lone forwards compute them: each group (row indices, and
        whether it is the row-by-row group) in its own products; the row-by-row group in chunks
        of at most ``lin.max_rows`` rows (``lin`` pads a short one itself)."""
        if len(groups) == 1 and isinstance(groups[0][0], slice) and not groups[0][1]:
            return lin(x)
        outs, order = [], []
        for rows, rowwise in groups:
            part = x[rows]
            if rowwise:
                step = min(lin.max_rows, ROWWISE_MAX_BLOCK)
                outs.extend(lin(chunk) for chunk in part.split(step))
            else:
                outs.append(lin(part))
            order.append(rows)
        y = torch.cat(outs)
        if len(order) == 1 and isinstance(order[0], slice) and order[0] == slice(0, x.shape[0]):
            return y
        idx = torch.cat([torch.arange(x.shape[0])[r] if isinstance(r, slice) else torch.tensor(r, dtype=torch.long)
                         for r in order])  # fmt: skip
        out = torch.empty_like(y)
        out[idx.to(y.device)] = y
        return out

    @torch.inference_mode()
    def forward(self, segments: list[Segment], hidden_layers: tuple[int, ...] | None = None):
        """Append every segment to its slot's cache in one forward; per segment, its logits
        ([n, vocab], float32) or None. With ``hidden_layers`` (as ``Backend.forward``): the
        pair (logits per segment, hidden states per segment)."""
        if not segments:
            return ([], []) if hidden_layers else []
        target, cfg = self.target, self.target.config
        slots = [s.slot for s in segments]
        if len(set(slots)) != len(slots):
            raise ValueError("a slot may contribute one segment per forward")
        sizes = [int(s.ids.shape[0]) for s in segments]
        starts = [self.lengths[s.slot] for s in segments]
        for s, n, start in zip(segments, sizes, starts):
            if n < 1:
                raise ValueError(f"slot {s.slot}: empty segment")
            if start + n > self.max_length:
                raise ValueError(f"context overflow in slot {s.slot}: {start} cached + {n} new > {self.max_length} tokens")
        for s, n, start in zip(segments, sizes, starts):
            self.caches[s.slot].reserve(start + n)
        bounds, a = [], 0
        for n in sizes:
            bounds.append((a, a + n))
            a += n
        total = a
        ids = torch.cat([s.ids.reshape(-1) for s in segments]).to(self.device)
        positions = [
            (s.positions.to(self.device) if s.positions is not None else torch.arange(start, start + n, device=self.device))
            for s, n, start in zip(segments, sizes, starts)
        ]  # fmt: skip
        pos_all = torch.cat(positions)
        cos = target._cos[pos_all].unsqueeze(0)  # [1, N, hd]
        sin = target._sin[pos_all].unsqueeze(0)
        rowwise = [n <= ROWWISE_MAX_BLOCK for n in sizes]
        groups: list[tuple[list[int] | slice, bool]] = []
        rw_rows = [r for (lo, hi), ok in zip(bounds, rowwise) if ok for r in range(lo, hi)]
        if rw_rows:
            groups.append((slice(0, total) if len(rw_rows) == total else rw_rows, True))
        groups.extend((slice(lo, hi), False) for (lo, hi), ok in zip(bounds, rowwise) if not ok)
        plans: dict[tuple[int, int | None], list[tuple]] = {}
        masks: dict[tuple[int, int | None], torch.Tensor] = {}
        pos_lists = [p.tolist() for p in positions]
        H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = H * hd, KV * hd
        scale = 1.0 / (hd**0.5)

        x = F.embedding(ids, target.embed)  # [N, D]
        captured: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(target.layers):
            if hidden_layers and i in hidden_layers:
                captured[i] = x
            h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
            qkv = self._linear(layer.qkv, h, groups)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = rotate(q.view(total, H, hd).transpose(0, 1), cos, sin)
            k = rotate(k.view(total, KV, hd).transpose(0, 1), cos, sin)
            v = v.view(total, KV, hd).transpose(0, 1)
            window = cfg.sliding_windows[i]
            attn = torch.empty(H, total, hd, dtype=q.dtype, device=q.device)
            for j, seg in enumerate(segments):
                lo, hi = bounds[j]
                start, end = starts[j], starts[j] + sizes[j]
                kc, vc = self.caches[seg.slot].k[i], self.caches[seg.slot].v[i]
                kc[:, start:end] = k[:, lo:hi]
                vc[:, start:end] = v[:, lo:hi]
                keys, values = kc[:, :end], vc[:, :end]
                if rowwise[j]:
                    if (j, window) not in plans:
                        plans[(j, window)] = row_plans(start, sizes[j], pos_lists[j], seg.tree_mask, window)
                    attn[:, lo:hi] = attention_rowwise(q[:, lo:hi], keys, values, plans[(j, window)], scale)
                else:
                    if (j, window) not in masks:
                        masks[(j, window)] = attention_mask(start, sizes[j], positions[j], seg.tree_mask, window, start, self.device)
                    attn[:, lo:hi] = attention(q[:, lo:hi], keys, values, masks[(j, window)], scale)
            x = x + self._linear(layer.o, attn.transpose(0, 1).reshape(total, q_size), groups)
            h = rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
            gate, up = self._linear(layer.gate_up, h, groups).chunk(2, dim=-1)
            x = x + self._linear(layer.down, F.silu(gate) * up, groups)
        for seg, n, start in zip(segments, sizes, starts):
            self.caches[seg.slot].length = start + n

        out = self._logits(x, segments, bounds, sizes, rowwise)
        if not hidden_layers:
            return out
        hidden = stack_hidden(hidden_layers, captured, rms_norm(x, target.norm, cfg.rms_norm_eps), len(target.layers))
        return out, [hidden[lo:hi] for lo, hi in bounds]

    def _logits(self, x, segments, bounds, sizes, rowwise) -> list[torch.Tensor | None]:
        """The logits of the segments that ask for them: rows of short segments together in
        invariant chunks, long ones on their own."""
        target, cfg = self.target, self.target.config
        wanted = [j for j, s in enumerate(segments) if s.logits]
        out: list[torch.Tensor | None] = [None] * len(segments)
        if not wanted:
            return out
        rows = [r for j in wanted for r in range(*bounds[j])]
        xs = rms_norm(x[rows], target.norm, cfg.rms_norm_eps)
        lg_groups: list[tuple[list[int] | slice, bool]] = []
        offset, rw = 0, []
        local: dict[int, tuple[int, int]] = {}
        for j in wanted:
            n = sizes[j]
            local[j] = (offset, offset + n)
            if rowwise[j]:
                rw.extend(range(offset, offset + n))
            else:
                lg_groups.append((slice(offset, offset + n), False))
            offset += n
        if rw:
            lg_groups.insert(0, (slice(0, offset) if len(rw) == offset else rw, True))
        logits = self._linear(target.lm_head, xs, lg_groups).float()
        for j in wanted:
            lo, hi = local[j]
            out[j] = logits[lo:hi]
        return out
