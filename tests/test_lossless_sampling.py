"""Speculative sampling leaves the target's distribution unchanged.

A tiny model with an 8-token vocabulary; 10k generations of 3 tokens each; the joint
distribution of the first two tokens (the third marginalised out) is compared by a chi-square
test with the exact distribution computed from transformers' logits. The drafts cover both
tokens, so chained acceptance, rejection with resampling and the bonus token are all exercised.
A deliberately broken verifier must fail the same test, so the test is known to have teeth.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

import specdecode.verification as verification_module  # where the one verification step takes its verifier
from specdecode import Engine, SamplingParams
from specdecode.draft import Draft
from specdecode.sampling import probabilities, sample

from .conftest import make_tiny_model

V = 8
DRAWS = 10_000
PROMPT = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]  # repeats, so prompt lookup has something to propose


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory, stories_path):
    root = tmp_path_factory.mktemp("small_vocab")
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    target = make_tiny_model(root / "target", "llama", seed=7, **kw)
    draft = make_tiny_model(root / "draft", "llama", seed=8, **kw)
    # Soften the target so that its distributions are spread (not nearly one-hot).
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.15)
    model.save_pretrained(str(target))
    return target, draft


def exact_joint(path, params: SamplingParams) -> np.ndarray:
    """P(x1, x2 | prompt) under the target, from transformers' logits."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        p1 = probabilities(model(torch.tensor([PROMPT])).logits[0, -1], params)
        seqs = torch.tensor([PROMPT + [x] for x in range(V)])
        p2 = probabilities(model(seqs).logits[:, -1], params)
    return (p1[:, None] * p2).numpy().astype(np.float64)


def joint_counts(engine: Engine, params: SamplingParams, draws: int = DRAWS) -> np.ndarray:
    engine.eos_ids = set()  # no early stop: every draw has its two tokens
    counts = np.zeros((V, V))
    for seed in range(draws):
        ids = engine.generate(PROMPT, max_new_tokens=3, temperature=params.temperature,
                              top_p=params.top_p, top_k=params.top_k, seed=seed).token_ids  # fmt: skip
        counts[ids[0], ids[1]] += 1
    return counts


def chi_square_p(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    expected = expected_probs * counts.sum()
    zero = expected_probs < 1e-12
    assert counts[zero].sum() == 0, "a token outside the allowed set (top-k/top-p) was generated"
    keep = ~zero
    # Pool rare cells so every expected count is >= 5 (the chi-square approximation holds).
    rare = keep & (expected < 5)
    obs = np.append(counts[keep & ~rare], counts[rare].sum())
    exp = np.append(expected[keep & ~rare], expected[rare].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


SETTINGS = [
    ("sps", SamplingParams(temperature=1.0)),
    ("sps", SamplingParams(temperature=0.7, top_p=0.8)),
    ("pld", SamplingParams(temperature=1.0)),
    ("pld", SamplingParams(temperature=1.3, top_k=5, top_p=0.9)),
]


@pytest.mark.parametrize("method,params", SETTINGS, ids=[f"{m}-{p.temperature}-{p.top_p}-{p.top_k}" for m, p in SETTINGS])
def test_speculative_sampling_preserves_the_distribution(small_vocab, method, params):
    target, draft = small_vocab
    engine = Engine.from_pretrained(
        target, method, draft_model=draft if method == "sps" else None, draft_length=4, adaptive=False, progress=False
    )
    counts = joint_counts(engine, params)
    p = chi_square_p(counts, exact_joint(target, params))
    assert p > 1e-3, f"chi-square p-value {p:.2e}: speculative sampling changed the distribution"
    # The drafts really were used and sometimes rejected (not a vacuous pass).
    s = engine.generate(PROMPT, max_new_tokens=3, temperature=params.temperature, top_p=params.top_p,
                        top_k=params.top_k, seed=1).stats  # fmt: skip
    assert s.drafted_tokens > 0


def test_the_test_catches_a_biased_verifier(small_vocab, monkeypatch):
    """Accepting every drafted token (no min(1, p/q) test) must fail the chi-square test."""
    target, draft = small_vocab

    def accept_everything(draft: Draft, logits, params, generator):
        return list(range(len(draft))), sample(probabilities(logits[len(draft)], params), generator)

    monkeypatch.setattr(verification_module, "verify_sampling", accept_everything)
    params = SamplingParams(temperature=1.0)
    engine = Engine.from_pretrained(target, "sps", draft_model=draft, draft_length=4, adaptive=False, progress=False)
    counts = joint_counts(engine, params, draws=3_000)  # a quarter of the draws already rejects it
    assert chi_square_p(counts, exact_joint(target, params)) < 1e-6


def test_seeded_sampling_is_reproducible(small_vocab):
    target, draft = small_vocab
    engine = Engine.from_pretrained(target, "sps", draft_model=draft, progress=False)
    a = engine.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=42).token_ids
    b = engine.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=42).token_ids
    c = engine.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=43).token_ids
    assert a == b and a != c


def test_probabilities_match_transformers_warpers():
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )  # fmt: skip

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    for t, k, p in itertools.product([0.5, 1.0, 2.0], [0, 5], [1.0, 0.9, 0.3]):
        warpers = LogitsProcessorList([TemperatureLogitsWarper(t)] + ([TopKLogitsWarper(k)] if k else [])
                                      + ([TopPLogitsWarper(p)] if p < 1 else []))  # fmt: skip
        ref = warpers(None, logits.clone()).softmax(-1)
        got = probabilities(logits, SamplingParams(temperature=t, top_k=k, top_p=p))
        assert torch.allclose(got, ref, atol=1e-6), (t, k, p)
