"""SWIFT: layer-skipping self-drafting, tree drafts, on-the-fly layer-set search."""

from __future__ import annotations

import json

import pytest
import torch

from specdecode import Engine, InvalidArgument, SamplingParams
from specdecode.backends import SkipSet
from specdecode.drafters import SwiftDrafter

from .conftest import ARCHS, make_tiny_model
from .test_lossless_greedy import STORY_PROMPTS, encode, hf_greedy
from .test_lossless_sampling import chi_square_p, exact_joint, joint_counts

CHAIN = (1, 1, 1, 1)
WIDE = (2, 3, 4, 5)


@pytest.fixture(autouse=True)
def _fixed_sizing(monkeypatch):
    """These tests check SWIFT's own mechanics (drafting, trees, search, its fallback). Payoff
    sizing would decide from this machine's measured costs whether drafting the 260K model pays,
    so on some CPUs no draft would be verified at all; a fixed length keeps every test about SWIFT."""
    monkeypatch.setenv("SPECDECODE_SIZING", "fixed")


@pytest.mark.parametrize("branches", [CHAIN, WIDE], ids=["chain", "tree"])
@pytest.mark.parametrize("optimize", [False, True], ids=["fixed-set", "optimizing"])
def test_stories_greedy_is_lossless(stories_path, branches, optimize):
    engine = Engine.from_pretrained(
        stories_path, "swift", branches=branches, optimize=optimize, context_window=16, fallback=False, progress=False
    )
    trees = 0
    for prompt in STORY_PROMPTS:
        ref = hf_greedy(str(stories_path), encode(stories_path, prompt), 120)
        got = engine.generate(prompt, max_new_tokens=120)
        assert got.token_ids == ref, prompt
        assert got.stats.accepted_draft_tokens > 0
        trees += got.stats.drafted_tokens > got.stats.target_forwards * 1.5
    if optimize:
        assert engine.drafter.state.steps > 0
    if branches == WIDE:
        assert trees > 0  # siblings were really drafted


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_is_lossless(tiny_models, arch):
    engine = Engine.from_pretrained(tiny_models[arch], "swift", branches=WIDE, context_window=8, fallback=False, progress=False)
    gen = torch.Generator().manual_seed(3)
    for n in range(3):
        ids = tuple(torch.randint(3, 512, (6 + 9 * n,), generator=gen).tolist())
        ref = hf_greedy(str(tiny_models[arch]), ids, 40)
        assert engine.generate(list(ids), max_new_tokens=40).token_ids == ref


def test_bf16_swift_equals_bf16_plain(stories_path):
    base = Engine.from_pretrained(stories_path, dtype="bfloat16", progress=False)
    swift = base.with_method("swift", branches=WIDE, context_window=16, fallback=False)
    for prompt in STORY_PROMPTS:
        assert swift.generate(prompt, max_new_tokens=100).token_ids == base.generate(prompt, max_new_tokens=100).token_ids


def test_drafting_leaves_the_cache_and_skips_sublayers(stories_path):
    engine = Engine.from_pretrained(stories_path, "swift", optimize=False, progress=False)
    drafter: SwiftDrafter = engine.drafter
    # 5 layers: inner layers 1..3, 6 sub-layers; 0.45 of them -> 3 skipped.
    assert len(drafter.state.attention) + len(drafter.state.mlp) == 3
    assert set(drafter.state.attention) | set(drafter.state.mlp) <= {1, 2, 3}
    tokens = engine.encode(STORY_PROMPTS[0])
    target = engine.target
    target.forward(torch.tensor(tokens[:-1]), logits_rows=None)
    before = target.k_cache[:, :, : target.length].clone()
    draft = drafter.propose(tokens, 12, SamplingParams(), None)
    assert target.length == len(tokens) - 1
    assert torch.equal(target.k_cache[:, :, : target.length], before)
    assert 0 < len(draft) <= 12
    # The chain's first token is the skipping model's argmax after the prompt.
    logits = target.forward(torch.tensor(tokens[-1:]), skip=drafter.state.skip)
    target.truncate(len(tokens) - 1)
    assert draft.tokens[0] == int(logits[0].argmax())


@pytest.mark.parametrize("fallback", [False, True], ids=["always-draft", "fallback"])
def test_sampling_with_tree_drafts_preserves_the_distribution(tmp_path_factory, stories_path, fallback):
    """With the fallback on, steps mix drafting and plain decoding (chosen from the past only)."""
    root = tmp_path_factory.mktemp("swift_small_vocab")
    kw = dict(vocab_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1)
    target = make_tiny_model(root / "t", "llama", seed=11, **kw)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    engine = Engine.from_pretrained(target, "swift", branches=(2, 3, 3, 3), confidence_threshold=0.0, max_depth=3,
                                    optimize=False, fallback=fallback, progress=False)  # fmt: skip
    counts = joint_counts(engine, params)
    p = chi_square_p(counts, exact_joint(target, params))
    assert p > 1e-3, f"chi-square p-value {p:.2e}"
    if fallback:
        return
    s = engine.generate([3, 4, 5, 6, 3, 4, 5, 6, 3, 4], max_new_tokens=3, temperature=0.9, top_p=0.95, seed=0).stats
    assert s.drafted_tokens > 2  # a real tree (siblings) was verified


def test_optimizer_beats_the_initial_set(stories_path):
    engine = Engine.from_pretrained(stories_path, "swift", context_window=32, patience=1000, target_score=1.0, seed=1, progress=False)
    drafter: SwiftDrafter = engine.drafter
    initial = drafter.state.skip
    engine.generate(STORY_PROMPTS[0], max_new_tokens=150)
    assert drafter.state.steps > 50
    # Judge both sets on the same text, freshly.
    tokens = engine.encode(STORY_PROMPTS[1])
    out = engine.generate(STORY_PROMPTS[1], max_new_tokens=60).token_ids
    drafter.begin(tokens)
    block = (tokens + out)[len(tokens) : len(tokens) + 33]
    engine.target.reset()
    engine.target.forward(torch.tensor(tokens), logits_rows=None)
    best, first = drafter.score(block, drafter.state.skip), drafter.score(block, initial)
    assert best > first, (best, first, drafter.state)


def test_saved_set_loads_and_reproduces_drafts(stories_path, tmp_path):
    path = tmp_path / "swift.json"
    tuned = Engine.from_pretrained(
        stories_path, "swift", skip_set_file=path, max_opt_steps=30, context_window=16, seed=5, fallback=False, progress=False
    )
    tuned.generate(STORY_PROMPTS[0], max_new_tokens=150)
    assert tuned.drafter.state.done and path.exists()  # the cap ends the search, then it is saved
    saved = json.loads(path.read_text())
    assert saved["model"]["num_layers"] == 5
    loaded = Engine.from_pretrained(stories_path, "swift", skip_set_file=path, fallback=False, progress=False)
    assert loaded.drafter.state.skip == tuned.drafter.state.skip
    assert loaded.drafter.state.done  # a finished search is not restarted
    a = tuned.generate(STORY_PROMPTS[2], max_new_tokens=60)
    b = loaded.generate(STORY_PROMPTS[2], max_new_tokens=60)
    assert a.token_ids == b.token_ids
    assert a.stats.accept_lengths == b.stats.accept_lengths  # the same drafts were proposed


@pytest.mark.parametrize(
    "options,argument",
    [
        ({"skip_ratio": 0.0}, "skip_ratio"),
        ({"skip_ratio": 1.0}, "skip_ratio"),
        ({"skip_ratio": 1.5}, "skip_ratio"),
        ({"confidence_threshold": -0.1}, "confidence_threshold"),
        ({"confidence_threshold": 1.2}, "confidence_threshold"),
        ({"target_score": 2}, "target_score"),
        ({"max_depth": 0}, "max_depth"),
        ({"branches": (1, 2)}, "branches"),
        ({"context_window": -3}, "context_window"),
        ({"fallback": "yes"}, "fallback"),
        ({"optimize": 1}, "optimize"),
    ],
)
def test_bad_options(stories_path, options, argument):
    with pytest.raises(InvalidArgument) as e:
        Engine.from_pretrained(stories_path, "swift", progress=False, **options)
    assert e.value.argument == argument


def test_skip_set_for_another_model_is_refused(stories_path, tiny_models, tmp_path):
    path = tmp_path / "other.json"
    other = Engine.from_pretrained(tiny_models["llama"], "swift", optimize=False, progress=False)
    other.drafter.save(path)
    with pytest.raises(InvalidArgument, match="tuned for another model"):
        Engine.from_pretrained(stories_path, "swift", skip_set_file=path, progress=False)
    path.write_text("{broken")
    with pytest.raises(InvalidArgument, match="cannot read"):
        Engine.from_pretrained(stories_path, "swift", skip_set_file=path, progress=False)


def test_swift_needs_the_native_backend(stories_path):
    with pytest.raises(InvalidArgument, match="native"):
        Engine.from_pretrained(stories_path, "swift", backend="hf", progress=False)


def test_tree_skip_set_type():
    assert not SkipSet()
    assert SkipSet(attention=frozenset({1}))


def test_tune_command_writes_a_reusable_file(stories_path, tmp_path):
    from typer.testing import CliRunner

    from specdecode.cli import app

    out = tmp_path / "tuned.json"
    res = CliRunner().invoke(app, ["tune", "-m", str(stories_path), "--out", str(out), "--max-new-tokens", "80",
                                   "--task", "qa", "-o", "max_opt_steps=20", "-o", "context_window=16"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["task"] == "qa" and data["steps"] >= 1
    engine = Engine.from_pretrained(stories_path, "swift", skip_set_file=out, task="qa", progress=False)
    assert sorted(engine.drafter.state.attention) == sorted(data["attention"])
    with pytest.raises(InvalidArgument, match="tuned for task 'qa'"):
        Engine.from_pretrained(stories_path, "swift", skip_set_file=out, task="rag", progress=False)


def test_fallback_decodes_plainly_while_drafting_does_not_pay(stories_path):
    """Drafting measured as slow (10 s per token, injected) loses to plain steps: the drafter
    proposes nothing except on probes, and the output is still plain greedy decoding."""
    engine = Engine.from_pretrained(stories_path, "swift", optimize=False, progress=False)
    payoff = engine.drafter.payoff
    for _ in range(payoff.window):  # a whole window: the real probes' times cannot outvote it here
        payoff.record(True, 1, 10.0)
    ref = hf_greedy(str(stories_path), encode(stories_path, STORY_PROMPTS[1]), 100)
    got = engine.generate(STORY_PROMPTS[1], max_new_tokens=100)
    assert got.token_ids == ref
    steps, plain = got.stats.target_forwards, got.stats.method["plain_steps"]
    assert plain >= steps - steps // payoff.probe_interval - 1 and plain < steps  # probes still draft
    assert got.stats.drafted_tokens > 0


def test_fallback_keeps_drafting_when_it_pays(stories_path):
    engine = Engine.from_pretrained(stories_path, "swift", optimize=False, progress=False)
    payoff = engine.drafter.payoff
    for _ in range(payoff.window):
        payoff.record(False, 1, 10.0)  # plain steps measured as very slow
    got = engine.generate(STORY_PROMPTS[1], max_new_tokens=100)
    assert 0 < got.stats.method["plain_steps"] <= got.stats.target_forwards // payoff.probe_interval + 1
