"""Any transformers ``AutoModelForCausalLM`` behind the backend interface.

The fallback for architectures the native backend lacks. The KV cache is transformers' own
``DynamicCache``; a rejected draft is rolled back by cropping it. Chain drafts only (no tree
masks) and no sub-layer skipping.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelLoadError
from .base import Backend, SkipSet


class HFBackend(Backend):
    name = "hf"
    supports_hidden = True

    def __init__(
        self,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
    ):
        from transformers import AutoModelForCausalLM, DynamicCache

        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise ModelLoadError(f"transformers cannot load a causal LM from {str(path)!r}: {e}") from None
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype
        cfg = self.model.config
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_length = min(max_length or limit, limit)
        self._cache_cls = DynamicCache
        self.cache = DynamicCache(config=cfg)
        self.length = 0

    def _truncate(self, length: int) -> None:
        if length == 0:
            self.cache = self._cache_cls(config=self.model.config)
        elif length < self.length:
            self.cache.crop(length - self.length)  # transformers 5: negative = tokens to remove
        self.length = length

    @torch.inference_mode()
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
        if tree_mask is not None:
            raise NotImplementedError("the hf backend verifies chain drafts only (no tree mask)")
        if skip:
            raise NotImplementedError("the hf backend cannot skip sub-layers; use the native backend")
        n = int(input_ids.shape[0])
        if self.length + n > self.max_length:
            raise ValueError(f"context overflow: {self.length} cached + {n} new > {self.max_length} tokens")
        if positions is None:
            positions = torch.arange(self.length, self.length + n)
        out = self.model(
            input_ids=input_ids.to(self.device)[None],
            position_ids=positions.to(self.device)[None],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1 if logits_rows is None else 0,
            output_hidden_states=bool(hidden_layers),
        )
        self.length += n
        if hidden_layers:
            states = out.hidden_states
            for i in hidden_layers:
                if not 0 <= i < len(states):
                    raise ValueError(f"hidden_layers: {i} is not a hidden state of this model (0..{len(states) - 1})")
            hidden = torch.stack([states[i][0] for i in hidden_layers], dim=1)
            return (None if logits_rows is None else out.logits[0][logits_rows].float()), hidden
        if logits_rows is None:
            return None
        return out.logits[0][logits_rows].float()
