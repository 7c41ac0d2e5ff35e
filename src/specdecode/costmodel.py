"""What a forward of the target costs on this machine, by block size and context length.

Speculation pays only when the tokens a draft adds are worth more than what verifying it costs,
and that cost is a property of the machine: a forward of 8 tokens after 128 cached costs 1.2x one
token on one of our CPUs and 1.4x on another (16 tokens: 1.36x / 1.8x); on a GPU it is nearly
flat. So it is measured, not assumed: at first use, forwards of block sizes 1..32 at two context
lengths (a few seconds), cached on disk keyed by the model, dtype, device, chip, threads and
library versions. While decoding, every verification forward's time corrects the curve (an
exponentially weighted ratio of measured to predicted time per block size), so a busy machine or
a stale cache is noticed.

Between measured points the cost is interpolated linearly in the block size; in the context
length it is linear (attention reads the cache once per token): T(n, L) = a(n) + b(n) * L.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from .backends import invariance

BLOCK_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
CONTEXTS = (64, 512)
REPEATS = 5  # the fastest of these is kept: noise only ever adds time
MAX_AGE_DAYS = 7  # a cached curve older than this is measured again
CACHE_VERSION = 1


def _cache_file() -> Path:
    root = os.environ.get("SPECDECODE_CACHE") or Path.home() / ".cache" / "specdecode"
    return Path(root) / "cost_curves.json"


def model_key(target) -> str:
    """What a cost curve belongs to: the model (its config and size), how it runs, and where."""
    cfg = getattr(target, "config", None)
    shape = ""
    if cfg is not None:
        shape = "|".join(str(getattr(cfg, k, "")) for k in ("model_type", "num_layers", "hidden_size",
                                                              "intermediate_size", "vocab_size"))  # fmt: skip
    plans = ""
    if hasattr(target, "linears"):  # the row-invariance plans change what a block costs
        plans = ",".join(f"{ls[0].pad_rows}/{ls[0].max_rows}" for ls in target.linears().values())
    return "|".join([f"v{CACHE_VERSION}", target.name, shape, str(target.dtype), plans,
                     invariance.machine_key(target.device)])  # fmt: skip


class CostModel:
    """Seconds for one target forward of ``n`` tokens after ``context`` cached ones."""

    def __init__(self, sizes: list[int], base: list[float], per_token: list[float]):
        self.sizes = list(sizes)
        self.base = list(base)  # a(n) at each measured size
        self.per_token = list(per_token)  # b(n): seconds per cached token
        self._ratio: dict[int, float] = {}  # online correction: measured / predicted, per size
        self._overall = 1.0  # the same over every size: for sizes not seen yet
        self.decay = 0.9

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_curve(cls, curve: dict[int, float], per_token: float = 0.0) -> "CostModel":
        """A model from seconds per block size (tests, or a user's own curve); flat in context
        unless ``per_token`` is given."""
        sizes = sorted(curve)
        return cls(sizes, [curve[n] for n in sizes], [per_token] * len(sizes))

    @classmethod
    @torch.inference_mode()
    def measure(cls, target, progress: bool = True) -> "CostModel":
        """Time forwards of every size in BLOCK_SIZES at the CONTEXTS lengths (one prefill of
        random tokens; the cache is rolled back between forwards and reset at the end)."""
        longest = min(max(CONTEXTS), target.max_length - max(BLOCK_SIZES) - 1)
        contexts = sorted({min(c, longest) for c in CONTEXTS})
        sizes = [n for n in BLOCK_SIZES if contexts[0] + n < target.max_length]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, target.vocab_size, (contexts[-1] + max(sizes),), generator=g)
        if progress:
            print(f"specdecode: measuring the target's forward cost (block sizes 1-{max(sizes)}, "
                  f"contexts {', '.join(map(str, contexts))}; once per machine)", file=sys.stderr)  # fmt: skip
        sync = (lambda: torch.cuda.synchronize(target.device)) if target.device.type == "cuda" else (lambda: None)
        try:
            target.reset()
            target.forward(ids[: contexts[-1]], logits_rows=None)
            times: dict[tuple[int, int], float] = {}
            for ctx in reversed(contexts):  # longest first: the cache can only be rolled back
                for _ in range(REPEATS):
                    for n in sizes:
                        target.truncate(ctx)
                        sync()
                        t = time.perf_counter()
                        target.forward(ids[ctx : ctx + n])
                        sync()
                        elapsed = time.perf_counter() - t
                        key = (n, ctx)
                        times[key] = min(times.get(key, float("inf")), elapsed)
        finally:
            target.reset()
        base, slope = [], []
        lo, hi = contexts[0], contexts[-1]
        for n in sizes:
            b = (times[(n, hi)] - times[(n, lo)]) / (hi - lo) if hi > lo else 0.0
            b = max(b, 0.0)
            slope.append(b)
            base.append(max(times[(n, lo)] - b * lo, 1e-6))
        # Timing noise aside, a bigger block never costs less than a smaller one, nor more than
        # its tokens decoded one at a time.
        for i in range(1, len(base)):
            base[i] = min(max(base[i], base[i - 1]), base[0] * sizes[i] / sizes[0])
        return cls(sizes, base, slope)

    @classmethod
    def for_target(cls, target, *, progress: bool = True, refresh: bool = False) -> "CostModel":
        """The cached curve for this target and machine, measured when missing or stale."""
        key = model_key(target)
        path = _cache_file()
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
        entry = cache.get(key)
        fresh = entry is not None and time.time() - entry.get("measured_at", 0) < MAX_AGE_DAYS * 86400
        if fresh and not refresh:
            return cls(entry["sizes"], entry["base"], entry["per_token"])
        model = cls.measure(target, progress=progress)
        cache[key] = {"sizes": model.sizes, "base": model.base, "per_token": model.per_token,
                      "measured_at": time.time()}  # fmt: skip
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # read-only home: measured again next time
        return model

    # ---- use ----------------------------------------------------------------------------------
    def _interp(self, values: list[float], n: int) -> float:
        sizes = self.sizes
        if n <= sizes[0]:
            return values[0] * n / sizes[0] if n < sizes[0] else values[0]
        for i in range(1, len(sizes)):
            if n <= sizes[i]:
                w = (n - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
                return values[i - 1] + w * (values[i] - values[i - 1])
        # Past the last measured size: extend the last segment's slope.
        if len(sizes) == 1:
            return values[-1] * n / sizes[-1]
        step = (values[-1] - values[-2]) / (sizes[-1] - sizes[-2])
        return values[-1] + step * (n - sizes[-1])

    def forward(self, n: int, context: int = 0) -> float:
        """Predicted seconds for a forward of ``n`` tokens after ``context`` cached."""
        raw = self._interp(self.base, n) + self._interp(self.per_token, n) * context
        return raw * self._ratio.get(n, self._overall)

    def observe(self, n: int, context: int, seconds: float) -> None:
        """A real forward's time: move the curve at this size toward it."""
        raw = self._interp(self.base, n) + self._interp(self.per_token, n) * context
        if raw <= 0 or seconds <= 0:
            return
        r = self._ratio.get(n, self._overall)
        self._ratio[n] = self.decay * r + (1 - self.decay) * (seconds / raw)
        self._overall = self.decay * self._overall + (1 - self.decay) * (seconds / raw)

    def relative(self, n: int, context: int = 0) -> float:
        """Cost of a forward of ``n`` tokens in units of a single-token forward."""
        return self.forward(n, context) / self.forward(1, context)

    def describe(self, context: int = 128) -> str:
        parts = [f"{n}: {self.relative(n, context):.2f}x" for n in (2, 4, 8, 16, 32) if n <= self.sizes[-1]]
        return f"forward cost after {context} cached tokens, relative to 1 token ({self.forward(1, context) * 1e3:.1f} ms): " + ", ".join(parts)
