"""benchmarks/random_checkpoint.py (random weights in a real model's shape) and the helpers of
benchmarks/memory.py: the tiny checkpoint has the published layout, loads with transformers and
with the native backend, both compute the same logits, and a rerun rewrites nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rc = _load("random_checkpoint")
memory = _load("memory")


VOCAB = 2048  # the tiny checkpoints' vocabulary: the native backend's load-time kernel check of a
# 152064-row lm_head takes ~30 s in float32 on a busy 2-core machine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("tiny") / "ckpt")


def _write(out: Path, **kw) -> Path:
    kw.setdefault("tokenizer_from", "none")
    kw.setdefault("log", lambda m: None)
    return rc.write_checkpoint("qwen2.5-7b", out, tiny=True, tiny_vocab=VOCAB, **kw)


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_full_shapes_match_the_published_checkpoints():
    for shape, tensors in (("qwen2.5-7b", 339), ("llama3.1-8b", 291)):
        sh = rc.SHAPES[shape]
        specs = rc.tensor_specs(sh.config)
        assert len(specs) == tensors
        assert sum(rc._numel(s) * 2 for _, s in specs) == sh.total_bytes
        plan = rc.plan_shards(specs, sh.shards)
        assert len(plan) == sh.shards and sum(map(len, plan)) == len(specs)
    qwen = dict(rc.tensor_specs(rc.QWEN25_7B_INSTRUCT))
    assert qwen["model.layers.27.self_attn.k_proj.weight"] == (512, 3584)
    assert qwen["model.layers.0.self_attn.q_proj.bias"] == (3584,)
    assert qwen["model.layers.3.mlp.down_proj.weight"] == (3584, 18944)
    assert qwen["lm_head.weight"] == qwen["model.embed_tokens.weight"] == (152064, 3584)


def test_tiny_layout_and_index(tiny):
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    files = sorted(tiny.glob("model-*-of-00002.safetensors"))
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    stored, total = {}, 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                assert t.dtype == torch.bfloat16
                stored[k] = (f.name, tuple(t.shape))
                total += t.numel() * 2
    assert index["weight_map"] == {k: v[0] for k, v in stored.items()}  # every tensor, in its file
    assert index["metadata"]["total_size"] == total
    cfg = json.loads((tiny / "config.json").read_text())
    assert {k: tuple(v[1]) for k, v in stored.items()} == dict(rc.tensor_specs(cfg))
    assert cfg["vocab_size"] == VOCAB and cfg["num_hidden_layers"] == 2 and not cfg["tie_word_embeddings"]
    published = rc.QWEN25_7B_INSTRUCT
    scaled = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_window_layers"}  # fmt: skip
    assert {k: v for k, v in cfg.items() if k not in scaled} == {k: v for k, v in published.items() if k not in scaled}
    assert rc.tiny_config(published)["vocab_size"] == 152064  # the default tiny keeps the vocabulary
    # the names transformers expects, no more and no fewer
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tiny)))
    assert set(model.state_dict()) == set(stored)


def test_tiny_loads_and_native_agrees_with_transformers(tiny):
    from transformers import AutoModelForCausalLM

    from specdecode.backends.native import NativeBackend

    ids = torch.tensor([1707, 11, 1879, 0, 2047, 220, 16, 17])
    hf = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    nb = NativeBackend(tiny, dtype=torch.float32)
    got = torch.cat([nb.forward(ids[:5]), nb.forward(ids[5:6]), nb.forward(ids[6:])])
    assert got.shape == ref.shape == (8, VOCAB)
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()
    bf = NativeBackend(tiny, dtype=torch.bfloat16)
    out = bf.forward(ids)
    assert out.shape == (8, VOCAB) and torch.isfinite(out.float()).all()


def test_rerun_does_not_rewrite_and_partial_resumes(tmp_path):
    out = tmp_path / "ckpt"
    _write(out)
    before = _stamps(out)
    second = out / "model-00002-of-00002.safetensors"
    content = second.read_bytes()
    _write(out)
    assert _stamps(out) == before  # a no-op: nothing rewritten

    # an interrupted write: the last shard gone, a half-written one left, no completion marker
    second.unlink()
    (out / ".complete.json").unlink()
    (out / (second.name + ".partial")).write_bytes(b"half")
    logs: list[str] = []
    _write(out, log=logs.append)
    assert second.read_bytes() == content  # deterministic: the same bytes again
    first = "model-00001-of-00002.safetensors"
    assert _stamps(out)[first] == before[first]  # the complete shard was kept
    assert not list(out.glob("*.partial"))
    assert any("complete already" in m for m in logs)


def test_refuses_another_checkpoint_unless_forced(tmp_path):
    out = tmp_path / "ckpt"
    _write(out)
    with pytest.raises(FileExistsError):
        _write(out, seed=1)
    _write(out, seed=1, force=True)
    assert json.loads((out / ".recipe.json").read_text())["seed"] == 1


def test_tokenizer_is_copied(tmp_path):
    src = tmp_path / "tok"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    out = rc.write_checkpoint("qwen2.5-7b", tmp_path / "ckpt", tiny=True, tokenizer_from=str(src), log=lambda m: None)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 152064  # the real vocabulary
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "tokenizer_config.json").is_file()
    assert str(src) in (out / "PROVENANCE.md").read_text()


def test_memory_helpers(tiny):
    weights, tensors = memory.safetensors_bytes(tiny)
    assert weights == json.loads((tiny / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert tensors == len(rc.tensor_specs(json.loads((tiny / "config.json").read_text())))
    status = memory.proc_status()
    assert status["VmRSS"] > 0 and status["VmHWM"] >= status["VmRSS"] // 2
    assert memory.proc_status(2**22 + 12345) == {}  # no such process
    report = {"model": "m", "weights_bf16_bytes": 2**30, "tensors": 3, "threads": 2, "max_new_tokens": 64,
              "cpu": "cpu", "commit": "abc", "skipped": ["llama.cpp: none"],
              "rows": [{"label": "generate vanilla", "kind": "generate", "load_peak": 3 * 2**30, "load_steady": 2**31,
                        "gen_peak": 3 * 2**30, "gen_steady": 2**31, "gen_phase_peak": 2**31, "load_s": 1.0,
                        "generate_s": 2.0, "tokens_per_s": 32.0},
                       {"label": "transformers", "kind": "transformers", "load_peak": 2**30, "load_steady": 2**30,
                        "gen_peak": 2**30, "gen_steady": 2**30, "gen_phase_peak": None, "load_s": 1.0, "generate_s": 2.0},
                       {"label": "serve vanilla", "kind": "serve", "error": "exit code 1: boom"}]}  # fmt: skip
    md = memory.markdown(report)
    assert "| generate vanilla | 3.00 | 2.00 | 3.00 | 2.00 | 2.00 | 2.00 | 2.00 |" in md
    assert "| serve vanilla | exit code 1: boom |" in md and "Skipped: llama.cpp: none" in md


def test_memory_bad_arguments(capsys):
    for argv, message in ((["--model", "no-such-model"], "--model"), (["--methods", "nope"], "--methods"),
                          (["--threads", "0"], "--threads"), (["--quantize", "int3"], "--quantize")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            memory.parse_args(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_llama_cpp_missing_is_a_reason(tmp_path):
    binary, ggufs, why = memory.find_llama_cpp(None, "m", ["BF16"])
    assert binary is None and "--llama-cpp" in why
    binary, ggufs, why = memory.find_llama_cpp(tmp_path, "m", ["BF16"])
    assert binary is None and "no llama-completion" in why
    exe = tmp_path / "llama-completion"
    exe.write_text("#!/bin/sh\n")
    os.chmod(exe, 0o755)
    binary, ggufs, why = memory.find_llama_cpp(tmp_path, "m", ["BF16"])
    assert binary == exe and not ggufs and "m-{BF16}.gguf" in why
    (tmp_path / "m-BF16.gguf").write_bytes(b"GGUF")
    assert memory.find_llama_cpp(tmp_path, "m", ["BF16", "Q4_K_M"])[1] == {"BF16": tmp_path / "m-BF16.gguf"}
