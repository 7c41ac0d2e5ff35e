"""Greedy speculative decoding is token-identical to plain greedy decoding (float32).

References come from transformers' own ``generate``; every method, several draft lengths, and
the edge cases: every draft accepted, none accepted, EOS inside an accepted draft, the token
budget running out mid-draft.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdecode import Engine
from specdecode.draft import Draft
from specdecode.drafters import Drafter

from .conftest import ARCHS

STORY_PROMPTS = [
    "Once upon a time, there was a little girl named Lily.",
    "The dog ran to the park. The dog ran to the park. The dog",
    "Tom had a big red ball.",
    "One day, a cat and a bird",
    "Sara said, \"Mom, can I have a cookie?\" Mom said,",
]


@functools.lru_cache(maxsize=None)
def hf_greedy(path: str, prompt_ids: tuple[int, ...], max_new_tokens: int, eos: int | None = -1) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    kwargs = {} if eos == -1 else {"eos_token_id": eos}
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs
    )
    return out[0, len(prompt_ids) :].tolist()


def encode(path, text) -> tuple[int, ...]:
    return tuple(AutoTokenizer.from_pretrained(str(path))(text)["input_ids"])


class OracleDrafter(Drafter):
    """Drafts from a known continuation: right for ``right`` tokens per draft, then wrong."""

    name = "oracle"

    def __init__(self, prompt_len: int, answer: list[int], right: int, vocab: int):
        self.prompt_len, self.answer, self.right, self.vocab = prompt_len, answer, right, vocab

    def propose(self, tokens, max_tokens, params, generator):
        done = len(tokens) - self.prompt_len
        out = []
        for i in range(max_tokens):
            if done + i >= len(self.answer):
                break
            tok = self.answer[done + i]
            out.append(tok if i < self.right else (tok + 1) % self.vocab)
        return Draft.chain(out)


@pytest.mark.parametrize("method", ["vanilla", "pld", "sps"])
def test_stories_every_method_matches_transformers(stories_path, noisy_stories, method):
    draft = noisy_stories if method == "sps" else None
    for k in (1, 3, 8):
        engine = Engine.from_pretrained(stories_path, method, draft_model=draft, draft_length=k, adaptive=False, progress=False)
        for prompt in STORY_PROMPTS:
            ids = encode(stories_path, prompt)
            ref = hf_greedy(str(stories_path), ids, 80)
            got = engine.generate(prompt, max_new_tokens=80)
            assert got.token_ids == ref, (method, k, prompt)
            assert sum(got.stats.accept_lengths) == len(ref)
            if method == "vanilla":
                assert got.stats.target_forwards == len(ref)


def test_speculation_actually_happens(stories_path, noisy_stories):
    """A guard against a vacuous pass: the drafts are used and accepted."""
    prompt = STORY_PROMPTS[1]
    pld = Engine.from_pretrained(stories_path, "pld", sizing="adaptive", progress=False).generate(prompt, max_new_tokens=80)
    sps = Engine.from_pretrained(stories_path, "sps", draft_model=noisy_stories, sizing="adaptive", progress=False).generate(
        prompt, max_new_tokens=80
    )
    for r in (pld, sps):
        assert r.stats.accepted_draft_tokens > 0
        assert r.stats.target_forwards < len(r.token_ids)
        assert r.stats.mean_accepted_tokens > 1.2


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["vanilla", "pld", "sps"])
def test_tiny_architectures_match_transformers(tiny_models, tiny_drafts, arch, method):
    path = tiny_models[arch]
    draft = tiny_drafts[arch] if method == "sps" else None
    engine = Engine.from_pretrained(path, method, draft_model=draft, draft_length=4, progress=False)
    gen = torch.Generator().manual_seed(ARCHS.index(arch))
    for n in range(4):
        ids = tuple(torch.randint(3, 512, (5 + 7 * n,), generator=gen).tolist())
        ids = ids + ids[:6]  # a repeat, so prompt lookup finds matches
        ref = hf_greedy(str(path), ids, 48)
        assert engine.generate(list(ids), max_new_tokens=48).token_ids == ref


@pytest.mark.parametrize("right", [0, 2, 100])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_all_none_or_some_accepted(stories_path, right, k):
    prompt = STORY_PROMPTS[0]
    ids = encode(stories_path, prompt)
    ref = hf_greedy(str(stories_path), ids, 60)
    base = Engine.from_pretrained(stories_path, progress=False)
    oracle = OracleDrafter(len(ids), ref, right, base.target.vocab_size)
    engine = Engine(base.target, base.tokenizer, oracle, draft_length=k)
    got = engine.generate(prompt, max_new_tokens=60)
    assert got.token_ids == ref
    s = got.stats
    if right == 0:
        assert s.accepted_draft_tokens == 0 and s.drafted_tokens > 0
    elif right >= k:
        assert s.accepted_draft_tokens == s.drafted_tokens > 0  # every draft accepted
        assert all(n == k + 1 for n in s.accept_lengths[:-2])
    else:
        assert 0 < s.accepted_draft_tokens < s.drafted_tokens


@pytest.mark.parametrize("method", ["oracle", "pld", "sps"])
def test_eos_inside_an_accepted_draft(stories_path, method):
    prompt = STORY_PROMPTS[0]
    ids = encode(stories_path, prompt)
    ref = hf_greedy(str(stories_path), ids, 60)
    eos = ref[9]  # pretend this token is the end of the text
    expect = hf_greedy(str(stories_path), ids, 60, eos=eos)
    assert expect == ref[: ref.index(eos) + 1]
    base = Engine.from_pretrained(stories_path, progress=False)
    if method == "oracle":
        engine = Engine(base.target, base.tokenizer, OracleDrafter(len(ids), ref, 100, 512), draft_length=8)
    else:
        draft = stories_path if method == "sps" else None  # self-draft: everything is accepted
        engine = base.with_method(method, draft_model=draft, draft_length=8, progress=False)
    engine.eos_ids = {eos}
    got = engine.generate(prompt, max_new_tokens=60)
    assert got.token_ids == expect
    assert got.finish_reason == "stop"
    if method != "pld":
        assert max(got.stats.accept_lengths) > 1  # EOS arrived inside a multi-token step


@pytest.mark.parametrize("max_new", [1, 2, 5, 7, 10, 13])
def test_max_new_tokens_mid_draft(stories_path, max_new):
    prompt = STORY_PROMPTS[0]
    ids = encode(stories_path, prompt)
    ref = hf_greedy(str(stories_path), ids, 13)
    base = Engine.from_pretrained(stories_path, progress=False)
    for engine in (
        Engine(base.target, base.tokenizer, OracleDrafter(len(ids), ref, 100, 512), draft_length=4),
        base.with_method("sps", draft_model=stories_path, draft_length=6, progress=False),
    ):
        got = engine.generate(prompt, max_new_tokens=max_new)
        assert got.token_ids == ref[:max_new]
        assert got.finish_reason == "length"


def test_adaptive_draft_length_is_lossless_and_adapts(stories_path, noisy_stories):
    engine = Engine.from_pretrained(stories_path, "sps", draft_model=noisy_stories, draft_length=2, adaptive=True, progress=False)
    for prompt in STORY_PROMPTS:
        ref = hf_greedy(str(stories_path), encode(stories_path, prompt), 80)
        got = engine.generate(prompt, max_new_tokens=80)
        assert got.token_ids == ref
    assert len(set(got.stats.accept_lengths)) > 2  # the draft length moved


def test_hf_backend_is_lossless_too(stories_path, noisy_stories):
    for method, draft in (("pld", None), ("sps", noisy_stories)):
        engine = Engine.from_pretrained(stories_path, method, draft_model=draft, backend="hf", dtype="float32", progress=False)
        assert engine.target.name == "hf"
        for prompt in STORY_PROMPTS[:3]:
            ref = hf_greedy(str(stories_path), encode(stories_path, prompt), 50)
            assert engine.generate(prompt, max_new_tokens=50).token_ids == ref


def test_context_end_is_respected(stories_path):
    engine = Engine.from_pretrained(stories_path, "pld", max_length=40, progress=False)
    ids = encode(stories_path, STORY_PROMPTS[1])
    got = engine.generate(STORY_PROMPTS[1], max_new_tokens=100)
    assert got.finish_reason == "length"
    assert len(ids) + len(got.token_ids) == 41  # the last token needs no cache slot
    assert got.token_ids == hf_greedy(str(stories_path), ids, 41 - len(ids))


@pytest.mark.parametrize("right", [0, 2, 100])
def test_bf16_speculation_equals_bf16_plain_decoding(stories_path, noisy_stories, right):
    """Exact in bf16 too: a token's logits do not depend on how many tokens share its forward
    (the native attention is computed row by row in float32), so greedy speculation repeats
    plain greedy decoding of the same model bit for bit, not just approximately."""
    base = Engine.from_pretrained(stories_path, dtype="bfloat16", progress=False)
    for prompt in STORY_PROMPTS:
        ids = list(encode(stories_path, prompt))
        ref = base.generate(prompt, max_new_tokens=120).token_ids
        for k in (3, 8):
            oracle = OracleDrafter(len(ids), ref, right, base.target.vocab_size)
            assert Engine(base.target, base.tokenizer, oracle, draft_length=k).generate(prompt, max_new_tokens=120).token_ids == ref
        for method, draft in (("pld", None), ("sps", noisy_stories)):
            e = base.with_method(method, draft_model=draft, progress=False)
            assert e.generate(prompt, max_new_tokens=120).token_ids == ref, (method, prompt)
