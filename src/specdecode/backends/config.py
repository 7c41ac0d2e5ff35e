"""The native backend's view of a model's config.json: the Llama family's shapes, attention
layout and RoPE tables, checked once (unsupported architectures are refused here with the
reason)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError, UnsupportedModel

# model_type -> whether q/k/v projections carry a bias regardless of `attention_bias`
SUPPORTED_MODEL_TYPES = {"llama": False, "mistral": False, "qwen2": True}
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


@dataclass
class NativeConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_windows: list[int | None]  # per layer; None = full attention
    inv_freq: torch.Tensor
    rope_attention_scaling: float
    torch_dtype: torch.dtype | None

    @classmethod
    def from_folder(cls, path: Path) -> "NativeConfig":
        try:
            raw = json.loads((path / "config.json").read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"model folder {str(path)!r} has no config.json") from None
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {e}") from None
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"the native backend supports model types {sorted(SUPPORTED_MODEL_TYPES)}, "
                f"not {model_type!r} (use backend='hf')"
            )
        from transformers import AutoConfig

        try:
            hf = AutoConfig.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from None
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModel(
                f"the native backend supports RoPE types {sorted(STATIC_ROPE_TYPES)}, "
                f"not {rope_type!r} (use backend='hf')"
            )
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if rope_type == "default":
            base = rope["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
        layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        window = getattr(hf, "sliding_window", None)
        if model_type == "mistral":
            windows = [window] * hf.num_hidden_layers
        else:
            windows = [window if t == "sliding_attention" else None for t in layer_types]
        attention_bias = bool(getattr(hf, "attention_bias", False))
        dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=SUPPORTED_MODEL_TYPES[model_type] or attention_bias,
            o_bias=attention_bias and model_type == "llama",
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            sliding_windows=windows,
            inv_freq=inv_freq.float(),
            rope_attention_scaling=float(scaling),
            torch_dtype=dtype if isinstance(dtype, torch.dtype) else None,
        )


