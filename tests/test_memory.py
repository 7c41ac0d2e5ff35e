"""Memory: weights held once, KV caches grown by need, a KV budget for the batch scheduler.

Exactness first: a cache that grew while decoding gives bit for bit the logits of one that never
had to (bf16), so growth cannot change an output. Then what is held: a packed linear keeps no
plain copy of its weight (it reads it again from the safetensors when a quantized copy is made),
a fresh cache holds one block, not the model's whole context.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from specdecode import Engine, InvalidArgument
from specdecode.backends.kv_cache import BLOCK, KVCache
from specdecode.backends.native import NativeBackend

from .test_batched import STORY_PROMPTS


def test_a_grown_cache_gives_the_logits_of_one_that_never_grew(stories_path):
    target = NativeBackend(stories_path, dtype=torch.bfloat16)
    assert target.cache.capacity == min(BLOCK, target.max_length)
    ids = torch.randint(3, 500, (BLOCK + 40,), generator=torch.Generator().manual_seed(0))
    roomy = target.with_cache(KVCache(*_shape(target), target.max_length, dtype=target.dtype, device=target.device,
                                      block=target.max_length))  # fmt: skip
    got, want = [], []
    for model, out in ((target, got), (roomy, want)):
        model.reset()
        model.forward(ids[:200], logits_rows=None)
        for t in range(200, len(ids)):  # decoding steps across the first block's end
            out.append(model.forward(ids[t : t + 1])[0])
    assert target.cache.capacity > BLOCK and roomy.cache.capacity == target.max_length
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(target.k_cache[:, :, : len(ids)], roomy.k_cache[:, :, : len(ids)])


def _shape(target):
    cfg = target.config
    return cfg.num_layers, cfg.num_kv_heads, cfg.head_dim


def test_kv_cache_grows_keeps_its_rows_and_gives_memory_back():
    cache = KVCache(2, 1, 4, 1000, dtype=torch.float32, device=torch.device("cpu"), block=8)
    assert cache.capacity == 8 and cache.nbytes == 2 * 2 * 1 * 8 * 4 * 4
    cache.k[:, :, :5] = 1.0
    cache.length = 5
    cache.reserve(9)
    assert cache.capacity == 16 and torch.equal(cache.k[:, :, :5], torch.ones(2, 1, 5, 4))
    cache.reserve(100)
    assert cache.capacity == 104  # the need, rounded to whole blocks (more than twice 16)
    with pytest.raises(ValueError, match="context overflow"):
        cache.reserve(1001)
    cache.release()
    assert cache.capacity == 8 and cache.length == 0
    assert cache.bytes_per_token == 2 * 2 * 1 * 4 * 4


def test_packed_weights_are_held_once(stories_path):
    target = NativeBackend(stories_path, dtype=torch.bfloat16)
    if not target.layers[0].qkv.packed:
        pytest.skip("no oneDNN packing here (bf16 CPU only): weights are plain and held once already")
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    with safe_open(str(next(stories_path.glob("*.safetensors"))), framework="pt") as st:
        plain = torch.cat([st.get_tensor(f"model.layers.0.{n}.weight") for n in names]).to(torch.bfloat16)
    lin = target.layers[0].qkv
    held = [v for v in vars(lin).values() if isinstance(v, torch.Tensor) and v.layout == torch.strided]
    assert not any(t.shape == plain.shape and torch.equal(t, plain) for t in held)  # no plain copy kept
    assert torch.equal(lin.plain(), plain)  # read again from the file when asked
    assert target.weight_bytes <= 1.05 * _checkpoint_bf16_bytes(stories_path)  # what the checkpoint holds


def _checkpoint_bf16_bytes(path) -> int:
    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                total += 2 * int(torch.tensor(shape).prod()) if shape else 2
    return total


def test_quant_copy_from_reread_weights_drafts_as_before(stories_path):
    """The int4 copy is built from weights read again from the files: pld+quant stays exact."""
    engine = Engine.from_pretrained(stories_path, "pld+quant", dtype="bfloat16", progress=False)
    vanilla = engine.with_method("vanilla", progress=False)
    for p in STORY_PROMPTS[:3]:
        assert engine.generate(p, max_new_tokens=40).token_ids == vanilla.generate(p, max_new_tokens=40).token_ids
    assert engine.drafter.nbytes > 0


def test_kv_budget_admits_what_fits_and_refuses_what_never_can(stories_path):
    engine = Engine.from_pretrained(stories_path, "pld", progress=False)
    per_token = engine.target.cache.bytes_per_token
    want = [engine.generate(p, max_new_tokens=24).token_ids for p in STORY_PROMPTS[:3]]
    need = max(len(engine.encode(p)) for p in STORY_PROMPTS[:3]) + 24
    sched = engine.batch(max_num_seqs=3, max_batch_tokens=16, kv_cache_bytes=need * per_token + per_token)
    handles = [sched.submit(p, max_new_tokens=24) for p in STORY_PROMPTS[:3]]
    most = 0
    while sched.has_work:
        sched.step()
        most = max(most, len(sched.running))
    assert most == 1  # one request's cache fits the budget, two do not: they ran in turn
    assert [h.result.token_ids for h in handles] == want
    with pytest.raises(InvalidArgument, match="KV cache") as e:
        sched.submit(STORY_PROMPTS[0], max_new_tokens=10 * need)
    assert e.value.argument == "max_new_tokens"
    with pytest.raises(InvalidArgument, match="kv_cache_bytes"):
        engine.batch(kv_cache_bytes=0)
