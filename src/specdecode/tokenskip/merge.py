"""A LoRA adapter merged into its base: a plain Hugging Face folder (safetensors, config,
tokenizer) that every backend loads, the native one included.

``merged_model(base, adapter)`` is "merge at load" for generate / serve / eval ``--adapter``:
the merged folder is cached under ``$SPECDECODE_CACHE/merged`` (default
``~/.cache/specdecode/merged``), keyed by the base's resolved path (and its weight files' sizes
and times) and a hash of the adapter's files, so the merge runs once per adapter.
The merge is peft's own (``PeftModel.from_pretrained(...).merge_and_unload()``) in float32; the
merged weights are saved in the base's dtype unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import InvalidArgument, ModelLoadError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def cache_root() -> Path:
    root = os.environ.get("SPECDECODE_CACHE") or Path.home() / ".cache" / "specdecode"
    return Path(root) / "merged"


def check_adapter(adapter: str | Path) -> Path:
    p = Path(str(adapter)).expanduser()
    if not (p / "adapter_config.json").is_file():
        raise InvalidArgument(
            "adapter", f"expected a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors); "
            f"{str(p)!r} has no adapter_config.json"
        )  # fmt: skip
    if not any((p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise InvalidArgument("adapter", f"{str(p)!r} has no adapter_model.safetensors")
    return p


def adapter_hash(adapter: Path) -> str:
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        f = adapter / name
        if f.is_file():
            h.update(name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _base_key(base: Path) -> str:
    parts = [str(base.resolve())]
    for f in sorted(base.iterdir()):
        if f.is_file() and f.suffix in WEIGHT_SUFFIXES:
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return "|".join(parts)


def _base_dtype(base: Path) -> str:
    cfg = json.loads((base / "config.json").read_text())
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, *, dtype: str = "auto", progress: bool = True) -> Path:
    """Merge ``adapter`` into ``base`` (folder or known name) and save the result to ``out``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..hub import resolve_model
    from ..loading import parse_dtype

    adapter_path = check_adapter(adapter)
    base_path = resolve_model(str(base), progress=progress)
    save_dtype = parse_dtype(_base_dtype(base_path) if dtype == "auto" else dtype) or torch.float32
    out = Path(out)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise ModelLoadError(f"cannot merge adapter {str(adapter_path)!r} into {str(base_path)!r}: {e}") from None
    merged = merged.to(save_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        # Tokenizer, chat template, generation config: the base's own files, as they are.
        for f in base_path.iterdir():
            if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and not f.name.endswith(".index.json") and f.name != "config.json":
                shutil.copy(f, tmp / f.name)
        generation = (tmp / "generation_config.json").read_bytes() if (tmp / "generation_config.json").exists() else None
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if generation is not None:
            (tmp / "generation_config.json").write_bytes(generation)
        (tmp / "merged_from.json").write_text(json.dumps(
            {"base": str(base_path), "adapter": str(adapter_path.resolve()), "adapter_sha256": adapter_hash(adapter_path),
             "dtype": str(save_dtype).replace("torch.", "")}, indent=1))  # fmt: skip
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def merged_model(base: str | Path, adapter: str | Path, *, progress: bool = True, cache_dir: str | Path | None = None) -> Path:
    """The folder of ``base`` with ``adapter`` merged in, from the cache (merged on first use)."""
    from ..hub import resolve_model

    adapter_path = check_adapter(adapter)
    base_path = resolve_model(str(base), progress=progress)
    key = hashlib.sha256(f"{_base_key(base_path)}|{adapter_hash(adapter_path)}".encode()).hexdigest()[:16]
    name = f"{base_path.name}+{adapter_path.resolve().name}-{key}"
    folder = Path(cache_dir) / name if cache_dir is not None else cache_root() / name
    if (folder / "merged_from.json").is_file():
        return folder
    if progress:
        print(f"merging adapter {str(adapter_path)!r} into {str(base_path)!r} -> {folder}", file=sys.stderr)
    return merge_adapter(base_path, adapter_path, folder, progress=progress)
