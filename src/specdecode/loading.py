"""Loading what an engine runs: dtypes by name, tokenizers, the target and an sps draft model.

Each argument is checked before anything heavy is loaded, so a typo costs no model load, and
every failure is an ``InvalidArgument`` naming the argument or a ``ModelLoadError``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .backends import Backend, load_backend
from .backends.quant import QuantConfig
from .errors import InvalidArgument, ModelLoadError
from .hub import resolve_model

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'auto'/None -> the model's own dtype; else a name from DTYPES or a torch dtype."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise InvalidArgument("dtype", f"expected auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ModelLoadError(f"cannot load a tokenizer from {str(path)!r}: {e}") from None


def check_same_tokenizer(target_tok, draft_tok, target_path: Path, draft_path: Path) -> None:
    """A draft model must speak the target's tokens: same vocabulary, same ids."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise InvalidArgument(
            "draft_model",
            f"the tokenizer of {str(draft_path)!r} differs from the target's ({str(target_path)!r}): "
            "a draft model must share the target's vocabulary",
        )


def load_target(
    model: str | Path,
    *,
    backend: str = "auto",
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    max_length: int | None = None,
    quantize: str | QuantConfig | None = None,
    progress: bool = True,
) -> tuple[Path, object, Backend]:
    """A target model (folder or known short name) -> (its folder, its tokenizer, its backend).
    ``quantize`` ("int4", "int4-g128", "int8"): the model itself with weight-only quantized linears."""
    torch_dtype = parse_dtype(dtype)
    quant = None if quantize is None else QuantConfig.parse(quantize, "quantize")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgument("device", f"expected a torch device such as cpu or cuda:0, got {device!r}") from None
    path = resolve_model(str(model), progress=progress)
    tokenizer = load_tokenizer(path)
    target = load_backend(path, backend, dtype=torch_dtype, device=device, max_length=max_length, quantize=quant)
    return path, tokenizer, target


def load_draft_model(
    draft_model: str | Path,
    *,
    target: Backend,
    tokenizer,
    target_path: Path | None,
    backend: str = "auto",
    draft_quant: str | QuantConfig | None = None,
    progress: bool = True,
) -> Backend:
    """An sps draft model, on the target's device, in its dtype, with its context length; its
    tokenizer must be the target's. ``draft_quant``: its linears quantized."""
    quant = None if draft_quant is None else QuantConfig.parse(draft_quant, "draft_quant")
    path = resolve_model(str(draft_model), progress=progress)
    check_same_tokenizer(tokenizer, load_tokenizer(path), target_path, path)
    return load_backend(
        path, backend, dtype=target.dtype, device=target.device, max_length=target.max_length, quantize=quant
    )


def eos_token_ids(tokenizer, target: Backend) -> set[int]:
    """Every id that ends generation: the tokenizer's EOS and the generation config's (a
    transformers model's own, else the folder's generation_config.json)."""
    ids: set[int] = set()
    gen_cfg = getattr(getattr(target, "model", None), "generation_config", None)
    sources = [getattr(tokenizer, "eos_token_id", None)]
    path = getattr(tokenizer, "name_or_path", None)
    if gen_cfg is None and path:
        try:
            from transformers import GenerationConfig

            gen_cfg = GenerationConfig.from_pretrained(path)
        except Exception:  # noqa: BLE001 - no generation_config.json is fine
            gen_cfg = None
    if gen_cfg is not None:
        sources.append(gen_cfg.eos_token_id)
    for s in sources:
        if isinstance(s, int):
            ids.add(s)
        elif isinstance(s, (list, tuple)):
            ids.update(int(i) for i in s)
    return ids
