"""Shared fixtures: the real tiny stories260K model and tiny random models of each architecture."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Measurements cached on disk (row invariance, cost curves) go to a fresh folder per test run:
# tests must neither read a developer's cache nor fill it with tiny random models.
os.environ["SPECDECODE_CACHE"] = tempfile.mkdtemp(prefix="specdecode-test-cache-")
# Under pytest-xdist (pyproject's addopts: -n 2) the workers share the cores: each gets its
# share of threads (and so do the processes tests start), rather than all of them each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)
STORIES = Path(os.environ.get("SPECDECODE_STORIES", REPO.parent / "shared" / "models" / "stories260k"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="session")
def stories_path() -> Path:
    if not (STORIES / "config.json").exists():
        pytest.skip(f"stories260K not found at {STORIES} (set SPECDECODE_STORIES)")
    return STORIES


def make_tiny_model(folder: Path, arch: str, *, seed: int = 0, vocab_size: int = 512, **overrides) -> Path:
    """Save a tiny random model of ``arch`` (llama, llama3, mistral, qwen2, smollm) with the
    stories260K tokenizer (512 tokens), so it can be used end to end."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
    )  # fmt: skip
    common.update(overrides)
    if arch == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "llama3":
        cfg = LlamaConfig(
            **common,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64},
        )  # fmt: skip
    elif arch == "smollm":
        cfg = LlamaConfig(**{**common, "num_key_value_heads": 4}, tie_word_embeddings=True)
    elif arch == "mistral":
        cfg = MistralConfig(**common, sliding_window=24, head_dim=16)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=True)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init gives near-uniform logits; sharpen them so greedy paths are decisive and
    # drafts get both accepted and rejected.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(folder)
    if STORIES.exists():
        for f in TOKENIZER_FILES:
            shutil.copy(STORIES / f, folder / f)
    return folder


ARCHS = ("llama", "llama3", "smollm", "mistral", "qwen2")


def make_chat_model(folder: Path, stories_path: Path, chat_template: str) -> Path:
    """stories260K copied to ``folder`` with a chat template (it has none), for the server tests."""
    import json

    folder.mkdir()
    for f in stories_path.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def noisy_stories(tmp_path_factory, stories_path) -> Path:
    """stories260K with noise on its weights: a draft model that agrees with it only partly."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("noisy_stories")
    for f in stories_path.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, folder / f.name)
    g = torch.Generator().manual_seed(0)
    weights = load_file(stories_path / "model.safetensors")
    noisy = {k: (v + 0.1 * v.std() * torch.randn(v.shape, generator=g)).contiguous() for k, v in weights.items()}
    save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, stories_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {a: make_tiny_model(root / a, a, seed=i) for i, a in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def tiny_drafts(tmp_path_factory, stories_path) -> dict[str, Path]:
    """For each architecture, another random model of it (a draft that mostly disagrees)."""
    root = tmp_path_factory.mktemp("tiny_drafts")
    return {a: make_tiny_model(root / a, a, seed=100 + i, num_hidden_layers=2) for i, a in enumerate(ARCHS)}
