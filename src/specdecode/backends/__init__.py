"""Model backends: ``native`` (our Llama-family implementation) and ``hf`` (any transformers LM)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InvalidArgument, UnsupportedModel
from .base import Backend, SkipSet
from .hf import HFBackend
from .native import NativeBackend

BACKENDS = ("auto", "native", "hf")

__all__ = ["BACKENDS", "Backend", "HFBackend", "NativeBackend", "SkipSet", "load_backend"]


def load_backend(
    path: str | Path,
    backend: str = "auto",
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_length: int | None = None,
    quantize=None,
) -> Backend:
    """Load ``path`` with the named backend; ``auto`` takes native when it supports the model.

    ``quantize`` (a ``quant.QuantConfig``): serve the model with weight-only quantized linears
    (native backend only)."""
    if backend not in BACKENDS:
        raise InvalidArgument("backend", f"expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ("auto", "native"):
        try:
            return NativeBackend(path, dtype=dtype, device=device, max_length=max_length, quantize=quantize)
        except UnsupportedModel as e:
            if backend == "native":
                raise
            if quantize is not None:
                raise InvalidArgument("quantize", f"quantized models run on the native backend, which cannot load this one: {e}") from None
    if quantize is not None:
        raise InvalidArgument("quantize", "quantized models run on the native backend, not 'hf'")
    return HFBackend(path, dtype=dtype, device=device, max_length=max_length)
