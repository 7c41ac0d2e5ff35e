"""Hybrid drafting A+B: lossless, both drafters used, clear errors."""

from __future__ import annotations

import re

import pytest

from specdecode import Engine
from specdecode.errors import InvalidArgument

PROMPTS = ["The dog ran to the park. The dog ran to the park. The dog", "Once upon a time, there was a little girl"]


def test_pld_plus_sps_is_plain_decoding_and_uses_both(stories_path, noisy_stories):
    vanilla = Engine.from_pretrained(stories_path, "vanilla", progress=False)
    hybrid = vanilla.with_method("pld+sps", draft_model=noisy_stories, draft_length=4)
    assert hybrid.method == "pld+sps"
    from_sps = 0
    for prompt in PROMPTS:
        result = hybrid.generate(prompt, max_new_tokens=60)
        assert result.token_ids == vanilla.generate(prompt, max_new_tokens=60).token_ids
        from_sps += result.stats.method["steps_drafted_by_sps"]
        assert result.stats.accepted_draft_tokens > 0
    assert 0 < from_sps


def test_hybrid_sampling_is_seeded_and_bounded(stories_path, noisy_stories):
    hybrid = Engine.from_pretrained(stories_path, "pld+sps", draft_model=noisy_stories, progress=False)
    a = hybrid.generate(PROMPTS[0], max_new_tokens=30, temperature=0.8, seed=3)
    b = hybrid.generate(PROMPTS[0], max_new_tokens=30, temperature=0.8, seed=3)
    assert a.token_ids == b.token_ids and 0 < len(a.token_ids) <= 30


@pytest.mark.parametrize(
    "method, draft, message",
    [
        ("pld+bogus", None, "or two of them joined by '+'"),
        ("pld+pld", None, "a hybrid joins two different drafting methods"),
        ("pld+vanilla", None, "a hybrid joins two different drafting methods"),
        ("pld+sps", None, "method 'pld+sps' needs a draft model"),
    ],
)
def test_bad_hybrids_are_clear_errors(stories_path, method, draft, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        Engine.from_pretrained(stories_path, method, draft_model=draft, progress=False)


def test_a_hybrid_with_a_tokenizer_reading_method_builds_and_is_exact(stories_path):
    """suffix reads corpora through the tokenizer; pld takes no tokenizer: each part gets what it takes."""
    vanilla = Engine.from_pretrained(stories_path, "vanilla", progress=False)
    for method in ("pld+suffix", "suffix+pld"):
        hybrid = vanilla.with_method(method, draft_length=4)
        assert hybrid.generate(PROMPTS[0], max_new_tokens=40).token_ids == vanilla.generate(PROMPTS[0], max_new_tokens=40).token_ids
