"""A random-weight checkpoint in the exact shape of a real 7-8B model, for memory and speed
measurements where the real weights cannot be downloaded (issue 23).

Writes a Hugging Face folder: config.json and generation_config.json as published, the weights
as sharded ``model-0000k-of-0000N.safetensors`` files with ``model.safetensors.index.json``, with
exactly the published tensor names, shapes and dtype (bf16), and a tokenizer with the same
vocabulary when one is at hand (Qwen2.5: copied from a fetched Qwen2.5-Coder model, which shares
Qwen2.5's tokenizer; Llama 3.1: only with ``--tokenizer-from``).

The values are random: N(0, std) for every matrix and bias (std 0.02, a fixed seed), ones for the
RMSNorm weights. A model like this computes exactly as much as the real one, so it measures
memory and time faithfully; its text is gibberish, so it measures nothing about acceptance.

Memory stays bounded: tensors are generated in chunks of at most ``CHUNK_ELEMENTS`` values and
streamed into the shard file (safetensors' header is computed up front), so the model is never
in RAM (about 100 MB at a time). Each shard is written to ``NAME.partial`` and renamed when
complete; a rerun skips complete shards (their content depends only on the seed, the tensor name
and the chunk) and rewrites partial ones, and is a no-op once ``.complete.json`` says all is done.
The result is about 15 GB (Qwen2.5-7B) or 16 GB (Llama-3.1-8B) in a cache folder: never commit it.

    python benchmarks/random_checkpoint.py                       # ~/.cache/specdecode/random/qwen2.5-7b-shape
    python benchmarks/random_checkpoint.py --shape llama3.1-8b --tokenizer-from DIR
    python benchmarks/random_checkpoint.py --tiny --out /tmp/tiny  # the same layout, 2 layers, in seconds
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK_ELEMENTS = 1 << 24  # values generated at once: 64 MB in float32, 32 MB in bf16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "tokenizer.model")  # fmt: skip

# ---- the published configurations -----------------------------------------------------------
#
# Qwen/Qwen2.5-7B-Instruct, config.json. Values as published on the Hugging Face hub (not
# reachable from here); checked against copies in public repositories:
# * every value below, verbatim: the "Qwen/Qwen2.5-7B-Instruct" section ("Parameter shapes",
#   "config.json") of a public model-inventory document found with the code search (file id
#   61558565367; it also lists each parameter's shape, matched by TENSORS below);
# * the architecture values (hidden_size 3584, intermediate_size 18944, 28 layers, 28 heads,
#   4 KV heads, vocab 152064, rope_theta 1e6, rms_norm_eps 1e-6, untied embeddings): also the
#   base Qwen2.5-7B's config in github.com/citsjtu2020/LLM-Prof sglang/Model_Config.md (commit
#   8434c8d1), which differs from the Instruct model only in max_position_embeddings (131072)
#   and eos_token_id (151643), and the config labelled "Qwen/Qwen2.5-7B-Instruct" in a public
#   FLOPs test (file id 59557435206: vocab 152064, hidden 3584, intermediate 18944, 28/28/4);
# * q/k/v biases (bias=True on q/k/v_proj only): the module printout of Qwen2-7B-Instruct in
#   github.com/Retruth/deontic nlp_models/qwen2/README.md (same architecture);
# * the total, 7,615,616,512 parameters = 15,231,233,024 bytes in bf16, is the published
#   model.safetensors.index.json's total_size, in 4 shards (the published file names).
QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
# Qwen/Qwen2.5-7B-Instruct, generation_config.json: the Qwen2.5 Instruct family's published
# defaults (the same file for 0.5B-72B; quoted for Qwen2.5-72B-Instruct in a public document
# found with the code search, file id 33011786348; temperature 0.7 / top_p 0.8 / top_k 20 /
# repetition_penalty 1.05 also in github.com/zlai-llm/zlai zlai/models/types/generate_config).
QWEN25_7B_INSTRUCT_GENERATION = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "transformers_version": "4.37.0",
}
# meta-llama/Llama-3.1-8B-Instruct, config.json, verbatim from the "meta-llama/Llama-3.1-8B-Instruct"
# section of the same model-inventory document (file id 61558565367); the architecture and
# rope_scaling values also in github.com/citsjtu2020/LLM-Prof sglang/Model_Config.md (the base
# Llama-3.1-8B, which differs in eos_token_id only). 8,030,261,248 parameters = 16,060,522,496
# bytes in bf16 (the published index's total_size), in 4 shards.
LLAMA31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},  # fmt: skip
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3",
    "use_cache": True,
    "vocab_size": 128256,
}
# meta-llama/Llama-3.1-8B-Instruct, generation_config.json as published (from memory of the
# published file; only its token ids matter here, and they match config.json's).
LLAMA31_8B_INSTRUCT_GENERATION = {
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": [128001, 128008, 128009],
    "temperature": 0.6,
    "top_p": 0.9,
    "transformers_version": "4.42.3",
}


@dataclass(frozen=True)
class Shape:
    name: str  # folder name in the cache
    source: str  # the model whose shape this is
    config: dict
    generation: dict
    shards: int  # as published
    total_bytes: int  # the published index's total_size (checked when not tiny)
    tokenizer_models: tuple[str, ...]  # fetched models (hub.models_dir()) whose tokenizer is the same


SHAPES = {
    "qwen2.5-7b": Shape("qwen2.5-7b-shape", "Qwen/Qwen2.5-7B-Instruct", QWEN25_7B_INSTRUCT,
                        QWEN25_7B_INSTRUCT_GENERATION, 4, 15_231_233_024,
                        ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")),  # fmt: skip
    "llama3.1-8b": Shape("llama3.1-8b-shape", "meta-llama/Llama-3.1-8B-Instruct", LLAMA31_8B_INSTRUCT,
                         LLAMA31_8B_INSTRUCT_GENERATION, 4, 16_060_522_496, ()),  # fmt: skip
}


def tiny_config(config: dict, vocab_size: int | None = None) -> dict:
    """The same architecture and vocabulary, scaled down: 2 layers, hidden 128, 8 heads (2 KV
    heads where the model has fewer KV heads than heads), head_dim 16, intermediate 256;
    ``vocab_size`` smaller than the model's for quicker tests (no tokenizer fits it then)."""
    cfg = copy.deepcopy(config)
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    kv = 2 if config["num_key_value_heads"] < config["num_attention_heads"] else 8
    cfg.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=kv)
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = 2
    return cfg


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Qwen2 / Llama checkpoint, with its shape, in the order written."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    o_bias = cfg.get("attention_bias", False)
    mlp_bias = cfg.get("mlp_bias", False)
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.append((p + "input_layernorm.weight", (h,)))
        for proj, rows in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
            out.append((p + f"self_attn.{proj}_proj.weight", (rows, h)))
            if qkv_bias:
                out.append((p + f"self_attn.{proj}_proj.bias", (rows,)))
        out.append((p + "self_attn.o_proj.weight", (h, heads * hd)))
        if o_bias:
            out.append((p + "self_attn.o_proj.bias", (h,)))
        out.append((p + "post_attention_layernorm.weight", (h,)))
        for proj, shape in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
            out.append((p + f"mlp.{proj}_proj.weight", shape))
            if mlp_bias:
                out.append((p + f"mlp.{proj}_proj.bias", (shape[0],)))
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (v, h)))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], shards: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors into ``shards`` files of about equal size (the last may be smaller)."""
    total = sum(_numel(s) * 2 for _, s in specs)
    target = -(-total // shards)
    out: list[list] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = _numel(shape) * 2
        if out[-1] and size + nbytes > target and len(out) < shards:
            out.append([])
            size = 0
        out[-1].append((name, shape))
        size += nbytes
    if len(out) != shards:
        raise ValueError(f"could not split {len(specs)} tensors into {shards} shards")
    return out


def shard_header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The safetensors header (length prefix included) of a shard holding ``tensors`` in order."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = _numel(shape) * 2
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(meta, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(header)) + header


def _seed(base: int, name: str, chunk: int) -> int:
    return (base * 1_000_003 + zlib.crc32(name.encode()) * 65_537 + chunk) % (2**63 - 1)


def write_tensor(f, name: str, shape: tuple[int, ...], seed: int, std: float) -> None:
    """Stream one tensor's bf16 bytes into ``f``, CHUNK_ELEMENTS values at a time."""
    if name.endswith("norm.weight"):
        f.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
        return
    cols = shape[-1]
    rows = _numel(shape) // cols
    step = max(1, CHUNK_ELEMENTS // cols)
    for chunk, start in enumerate(range(0, rows, step)):
        n = min(step, rows - start)
        g = torch.Generator().manual_seed(_seed(seed, name, chunk))
        block = torch.randn(n, cols, generator=g).mul_(std).to(torch.bfloat16)
        f.write(block.view(torch.uint8).numpy().data)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def find_tokenizer(shape: Shape, explicit: str | None) -> Path | None:
    if explicit is not None:
        return None if explicit == "none" else Path(explicit).expanduser()
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from specdecode.hub import models_dir

        root = models_dir()
    except ImportError:
        root = Path(os.environ.get("SPECDECODE_MODELS") or Path.home() / ".cache" / "specdecode" / "models")
    for name in shape.tokenizer_models:
        if (root / name / "tokenizer.json").is_file():
            return root / name
    return None


def default_out(shape: Shape, tiny: bool) -> Path:
    return Path.home() / ".cache" / "specdecode" / "random" / (shape.name + ("-tiny" if tiny else ""))


def write_checkpoint(
    shape: str = "qwen2.5-7b",
    out: str | Path | None = None,
    *,
    tiny: bool = False,
    seed: int = 0,
    std: float = 0.02,
    shards: int | None = None,
    tokenizer_from: str | None = None,
    tiny_vocab: int | None = None,
    force: bool = False,
    log=print,
) -> Path:
    """Write (or complete, or leave as it is) the checkpoint; returns its folder."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    sh = SHAPES[shape]
    if tiny_vocab is not None and (not tiny or not 16 <= tiny_vocab <= sh.config["vocab_size"]):
        raise ValueError(f"tiny_vocab needs tiny and a value in [16, {sh.config['vocab_size']}], got {tiny_vocab}")
    cfg = tiny_config(sh.config, tiny_vocab) if tiny else copy.deepcopy(sh.config)
    n_shards = shards or (2 if tiny else sh.shards)
    if n_shards < 1:
        raise ValueError(f"shards must be >= 1, got {n_shards}")
    out = Path(out).expanduser() if out is not None else default_out(sh, tiny)
    specs = tensor_specs(cfg)
    total = sum(_numel(s) * 2 for _, s in specs)
    if not tiny and total != sh.total_bytes:
        raise AssertionError(f"{sh.source}: {total} bytes, the published index says {sh.total_bytes}")
    plan = plan_shards(specs, n_shards)
    files = [f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors" for k in range(n_shards)]
    headers = [shard_header(t) for t in plan]
    sizes = [len(hd) + sum(_numel(s) * 2 for _, s in t) for hd, t in zip(headers, plan)]
    recipe = {"shape": shape, "source": sh.source, "tiny": tiny, "seed": seed, "std": std, "files": files,
              "config": cfg, "writer": 1}  # fmt: skip
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    marker = out / ".complete.json"

    def complete() -> bool:
        try:
            done = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return done.get("digest") == digest and all((out / f).is_file() and (out / f).stat().st_size == s
                                                    for f, s in zip(files, sizes))  # fmt: skip

    if complete():
        log(f"{out}: complete already ({total / 1e9:.2f} GB), nothing to do")
        return out
    if out.exists() and any(out.iterdir()):
        recorded = out / ".recipe.json"
        try:
            same = json.loads(recorded.read_text()).get("digest") == digest
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            if not force:
                raise FileExistsError(f"{out} holds something else (another shape, seed or std, or not ours); "
                                      "pass --force to replace it, or choose another --out")  # fmt: skip
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / ".recipe.json", {"digest": digest, **{k: v for k, v in recipe.items() if k != "config"}})
    marker.unlink(missing_ok=True)
    for stale in out.glob("*.partial"):
        stale.unlink()

    def shard_done(k: int) -> bool:
        path = out / files[k]
        if not path.is_file() or path.stat().st_size != sizes[k]:
            return False
        with open(path, "rb") as f:
            return f.read(len(headers[k])) == headers[k]

    todo = [k for k in range(n_shards) if not shard_done(k)]
    need = sum(sizes[k] for k in todo)
    free = shutil.disk_usage(out).free
    if need > free - (1 << 30):
        raise OSError(f"{out}: {need / 1e9:.1f} GB to write, {free / 1e9:.1f} GB free on its disk")

    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", sh.generation)
    tok_src = find_tokenizer(sh, tokenizer_from)
    tok_note = "none: no tokenizer with this vocabulary was at hand (pass --tokenizer-from DIR)"
    if cfg["vocab_size"] != sh.config["vocab_size"]:
        tok_src, tok_note = None, f"none: the vocabulary was cut to {cfg['vocab_size']} tokens"
    if tok_src is not None:
        copied = [f for f in TOKENIZER_FILES if (tok_src / f).is_file()]
        if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
            raise FileNotFoundError(f"--tokenizer-from {tok_src}: no tokenizer.json or tokenizer.model there")
        for f in copied:
            shutil.copyfile(tok_src / f, out / f)
        tok_note = f"copied from {tok_src} ({', '.join(copied)})"
        log(f"tokenizer: {tok_note}")
    else:
        log(f"tokenizer: {tok_note}")

    for k in range(n_shards):
        path = out / files[k]
        if k not in todo:
            log(f"{files[k]}: complete already")
            continue
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as f:
            f.write(headers[k])
            for name, shp in plan[k]:
                write_tensor(f, name, shp, seed, std)
            f.flush()
            os.fsync(f.fileno())
        if tmp.stat().st_size != sizes[k]:
            raise RuntimeError(f"{tmp}: wrote {tmp.stat().st_size} bytes, expected {sizes[k]}")
        tmp.replace(path)
        log(f"{files[k]}: {sizes[k] / 1e9:.2f} GB, {len(plan[k])} tensors")

    weight_map = {name: files[k] for k, tensors in enumerate(plan) for name, _ in tensors}
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})  # fmt: skip
    (out / "PROVENANCE.md").write_text(
        f"# Random weights in the shape of {sh.source}{' (tiny: scaled down)' if tiny else ''}\n\n"
        f"Written by benchmarks/random_checkpoint.py: config.json and generation_config.json as published "
        f"for {sh.source}{' with ' + ', '.join(f'{k}={cfg[k]}' for k in ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads')) if tiny else ''}; "
        f"{len(specs)} tensors ({total:,} bytes in bf16) with the published names and shapes, values "
        f"N(0, {std}) (RMSNorm weights: ones), seed {seed}, in {n_shards} shards.\n\n"
        f"Tokenizer: {tok_note}.\n\nThe weights are random: the model's text is gibberish. Do not commit this folder.\n"
    )  # fmt: skip
    _write_json(marker, {"digest": digest, "total_size": total, "files": dict(zip(files, sizes))})
    log(f"{out}: complete ({total / 1e9:.2f} GB, {len(specs)} tensors in {n_shards} shards)")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b", help="whose shape (default qwen2.5-7b)")
    p.add_argument("--out", type=Path, help="folder (default ~/.cache/specdecode/random/SHAPE-shape[-tiny])")
    p.add_argument("--tiny", action="store_true", help="the same layout scaled down (2 layers, hidden 128): seconds, ~80 MB")
    p.add_argument("--tiny-vocab", type=int, help="with --tiny: a smaller vocabulary (no tokenizer then), for quick tests")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of the weights (default 0.02)")
    p.add_argument("--shards", type=int, help="number of shard files (default: as published, 4; tiny: 2)")
    p.add_argument("--tokenizer-from", help="a folder whose tokenizer files to copy ('none' for no tokenizer; "
                   "default for Qwen2.5: a fetched qwen2.5-coder-1.5b/0.5b)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace --out when it holds a different checkpoint")
    args = p.parse_args(argv)
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if not args.std > 0:
        p.error(f"--std must be positive, got {args.std}")
    if args.shards is not None and args.shards < 1:
        p.error(f"--shards must be >= 1, got {args.shards}")
    if args.tokenizer_from not in (None, "none") and not Path(args.tokenizer_from).expanduser().is_dir():
        p.error(f"--tokenizer-from {args.tokenizer_from} is not a folder")
    try:
        out = write_checkpoint(args.shape, args.out, tiny=args.tiny, seed=args.seed, std=args.std, shards=args.shards,
                               tokenizer_from=args.tokenizer_from, tiny_vocab=args.tiny_vocab, force=args.force,
                               log=lambda m: print(m, file=sys.stderr, flush=True))  # fmt: skip
    except (ValueError, OSError, AssertionError) as e:
        p.exit(2, f"random_checkpoint.py: error: {e}\n")
    print(out)


if __name__ == "__main__":
    main()
