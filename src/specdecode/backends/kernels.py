"""The native backend's kernels: RMS norm, rotary embedding, attention (whole-block and row by
row), and the linear layer with its packed weights and row-invariance plan.

Pure functions of tensors (no model, no cache), shared by the one-sequence forward
(``native.py``) and the batched one (``batched.py``), and by the quantized linears
(``quant.py``), which subclass ``Linear``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import invariance
from .invariance import ROWWISE_MAX_BLOCK


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers: normalise in float32, cast back, then scale.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def stack_hidden(hidden_layers, captured: dict[int, torch.Tensor], normed: torch.Tensor, num_layers: int) -> torch.Tensor:
    """The hidden states named by ``hidden_layers`` (transformers' ``output_hidden_states``
    numbering: i < num_layers is the input of decoder layer i, 0 the embeddings; num_layers the
    last layer's output after the final norm) as one [rows, len(hidden_layers), D] tensor."""
    parts = []
    for i in hidden_layers:
        if not 0 <= i <= num_layers:
            raise ValueError(f"hidden_layers: {i} is not a hidden state of a {num_layers}-layer model (0..{num_layers})")
        parts.append(normed if i == num_layers else captured[i])
    return torch.stack(parts, dim=1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of q [H, T, hd] over k, v [KV, L, hd] (grouped-query), in float32, one matmul
    for the whole block: for long blocks (prefill) and scoring, where exactness per row is not
    needed."""
    heads, n, hd = q.shape
    kv = k.shape[0]
    qf = q.float().reshape(kv, heads // kv * n, hd)
    scores = torch.matmul(qf, k.float().transpose(1, 2)).mul_(scale)  # [KV, G*T, L]
    if mask is not None:
        scores = scores.view(kv, heads // kv, n, -1).masked_fill_(~mask, float("-inf")).view(kv, -1, mask.shape[-1])
    out = torch.matmul(scores.softmax(dim=-1), v.float())  # [KV, G*T, hd]
    return out.view(heads, n, hd).to(q.dtype)


def row_plans(
    start: int, n: int, positions: list[int], tree_mask: torch.Tensor | None, window: int | None
) -> list[tuple]:
    """For each block row, the cache slots it attends to, in order:

    ("range", lo, hi)            slots lo .. hi-1 (a decoding step; a chain; a tree's spine)
    ("prefix_self", lo, hi, r)   slots lo .. hi-1, then the row's own slot r (a tree leaf whose
                                 ancestors are the first rows of the block)
    ("index", slots)             anything else, gathered
    """
    plans: list[tuple] = []
    tm = tree_mask.to("cpu", torch.bool).tolist() if tree_mask is not None else None
    for t in range(n):
        p = positions[t]
        lo = 0 if window is None else max(0, p - window + 1)
        if tm is None:  # a chain: positions are slots
            plans.append(("range", lo, start + t + 1))
            continue
        anc = [j for j in range(t) if tm[t][j]]
        if lo == 0 and anc == list(range(len(anc))):
            if t == len(anc):
                plans.append(("range", 0, start + t + 1))
            else:
                plans.append(("prefix_self", 0, start + len(anc), start + t))
            continue
        seen = [j for j in anc + [t] if window is None or p - positions[j] < window]
        plans.append(("index", list(range(lo, start)) + [start + j for j in seen]))
    # A leaf's trick overwrites the slot just after its prefix; that slot must hold a row that
    # is itself a plain range (never another leaf's own key).
    leaves = {plan[3] for plan in plans if plan[0] == "prefix_self"}
    for t, plan in enumerate(plans):
        if plan[0] == "prefix_self" and plan[2] in leaves:
            plans[t] = ("index", list(range(plan[1], plan[2])) + [plan[3]])
    return plans


def attention_rowwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plans: list[tuple], scale: float) -> torch.Tensor:
    """Attention of q [H, T, hd] over the cache k, v [KV, L, hd], one row at a time.

    Each row is computed exactly as when its token is decoded alone: the same matmul shapes
    over the same keys in the same order. So a token's output in a verification block is bit
    for bit what plain decoding gives, even in bf16 (a batched matmul's reduction order depends
    on how many rows share it); speculative decoding then repeats plain decoding exactly.
    """
    heads, n, hd = q.shape
    kv = k.shape[0]
    qf = q.float()
    leaves = [t for t, plan in enumerate(plans) if plan[0] == "prefix_self"]
    # Float32 copies, private ones when the leaf trick below edits them (in a float32 model
    # .float() would return the cache itself).
    kf, vf = k.to(torch.float32, copy=bool(leaves)), v.to(torch.float32, copy=bool(leaves))
    out = torch.empty(heads, n, hd, dtype=torch.float32, device=q.device)

    def attend(t: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        scores = torch.matmul(qf[:, t].reshape(kv, heads // kv, hd), keys.transpose(1, 2)).mul_(scale)
        out[:, t] = torch.matmul(scores.softmax(dim=-1), values).reshape(heads, hd)

    for t, plan in enumerate(plans):
        if plan[0] == "range":
            attend(t, kf[:, plan[1] : plan[2]], vf[:, plan[1] : plan[2]])
        elif plan[0] == "index":
            idx = torch.tensor(plan[1], device=q.device)
            attend(t, kf[:, idx], vf[:, idx])
    # Leaves last, deepest first: each puts its own key/value right after its prefix (a slot no
    # later row reads) and attends to one contiguous run, as plain decoding would.
    for t in sorted(leaves, key=lambda t: -plans[t][2]):
        _, lo, hi, own = plans[t]
        kf[:, hi], vf[:, hi] = kf[:, own], vf[:, own]
        attend(t, kf[:, lo : hi + 1], vf[:, lo : hi + 1])
    return out.to(q.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


class Linear:
    """y = x W^T + b.

    On CPU in bf16 the weight is pre-packed once into oneDNN's blocked layout: decoding's
    products of 1-16 rows read it at ~1.7x the bandwidth of F.linear's plain layout.

    Weights once: a packed linear keeps only its packed weight. What needs the plain one (a
    quantized copy built from it) asks ``plain()``, which reads it again from ``source`` (the
    model's memory-mapped safetensors, one linear at a time) rather than holding a second copy
    of every weight for the life of the model. The row-invariance cache is keyed on a digest of
    the plain weight taken here, while it is at hand.

    Row invariance: a token's output must not depend on how many tokens share the product, or
    speculative decoding would drift from plain decoding by rounding. Blocks of up to
    ROWWISE_MAX_BLOCK rows are cut into chunks of ``max_rows`` and shorter ones (a decoding
    step's single row) padded to ``pad_rows``, both set from a load-time check of the kernel
    (see ``invariance.py``).
    """

    kernel = "torch"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool,
                 source: Callable[[], torch.Tensor] | None = None):  # fmt: skip
        """``source``: reads the plain weight again (default: keep ``weight`` itself, which a
        packed linear then holds twice)."""
        self.bias = bias
        self.packed = pack
        self.shape = tuple(weight.shape)
        self.dtype, self.device = weight.dtype, weight.device
        self.fingerprint = invariance.weight_fingerprint(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if pack else weight
        self.source = source if source is not None or not pack else (lambda: weight)
        if pack:
            self.kernel = "onednn-packed"
        self.max_rows = ROWWISE_MAX_BLOCK  # until checked
        self.pad_rows = 1
        self.captured: list[torch.Tensor] | None = None  # inputs seen, while calibrating

    def plain(self) -> torch.Tensor:
        """The weight [out, in] in the plain layout (read again from the source if packed)."""
        if not self.packed:
            return self.weight
        if self.source is None:
            raise RuntimeError("this packed linear has no source to read its plain weight from")
        return self.source()

    @property
    def nbytes(self) -> int:
        """Bytes this linear holds (weight and bias; a weight shared with the embedding counts
        here too)."""
        tensors = [self.weight] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def check_rows(self, name: str, activations: torch.Tensor | None = None) -> invariance.RowCheck:
        stand_in = torch.empty((1, 1), dtype=self.dtype, device=self.device).expand(self.shape)
        result = invariance.check_linear(
            self._apply, stand_in, name=name, kernel=self.kernel, dtype=self.dtype, activations=activations,
            fingerprint=self.fingerprint,
        )  # fmt: skip
        self.pad_rows, self.max_rows = result.pad_rows, result.chunk_rows
        return result

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.captured is not None:
            self.captured.append(x.detach())
        n = x.shape[0]
        if n > ROWWISE_MAX_BLOCK or self.pad_rows <= n <= self.max_rows:  # prefill needs no invariance
            return self._apply(x)
        out = []
        for chunk in x.split(self.max_rows):
            k = chunk.shape[0]
            if k < self.pad_rows:  # copies of its last row: the kernel path the check vouched for
                chunk = torch.cat([chunk, chunk[-1:].expand(self.pad_rows - k, -1)])
            out.append(self._apply(chunk)[:k])
        return torch.cat(out)


def attention_mask(start: int, n: int, positions: torch.Tensor, tree_mask: torch.Tensor | None, window: int | None,
                   context: int, device: torch.device) -> torch.Tensor:  # fmt: skip
    """Bool mask [n, start + n] for a block of ``n`` tokens after ``start`` cached ones: True
    where a block token may attend (cached tokens before ``context``, its block ancestors, and
    within a sliding ``window`` of positions where the layer has one). For whole-block attention;
    single tokens and verification blocks attend row by row, without a mask."""
    block = tree_mask if tree_mask is not None else torch.ones(n, n, dtype=torch.bool).tril_()
    seen = torch.arange(start) < context
    mask = torch.cat([seen.expand(n, start), block.to("cpu", torch.bool)], dim=1).to(device)
    if window is not None:
        # Sliding window on positions, as transformers: keep keys with q_pos - k_pos < window.
        key_pos = torch.cat([torch.arange(start, device=device), positions])
        mask &= (positions[:, None] - key_pos[None, :]) < window
    return mask
