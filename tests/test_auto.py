"""``auto``: per-request choice among exact methods by measured decode speed (auto.py)."""

from __future__ import annotations

import pytest
import torch

from specdecode import Engine, InvalidArgument
from specdecode.auto import ArmChooser, AutoEngine
from specdecode.bench.methods import parse_methods

from .conftest import ARCHS
from .test_lossless_greedy import STORY_PROMPTS, encode, hf_greedy


@pytest.fixture(autouse=True)
def _grow_shrink_sizing(monkeypatch):
    """The arms' drafts are sized by the deterministic grow/shrink rule, so that every arm
    really drafts (payoff sizing may decide from this machine's timings that none pays)."""
    monkeypatch.setenv("SPECDECODE_SIZING", "adaptive")


def test_every_request_is_plain_greedy_and_every_arm_is_tried(stories_path):
    engine = Engine.from_pretrained(stories_path, "auto", progress=False)
    assert isinstance(engine, AutoEngine) and engine.method == "auto"
    assert list(engine.arm_engines) == ["pld+quant", "pld", "quant"]
    used, accepted = set(), 0
    for prompt in STORY_PROMPTS * 2:
        ref = hf_greedy(str(stories_path), encode(stories_path, prompt), 60)
        got = engine.generate(prompt, max_new_tokens=60)
        assert got.token_ids == ref, prompt
        used.add(got.stats.method["auto.arm"])
        accepted += got.stats.accepted_draft_tokens
    assert used == {"pld+quant", "pld", "quant"}  # each arm decoded at least once
    assert accepted > 0
    assert {f"auto.tokens_per_s.{a}" for a in used} <= set(got.stats.method)


def test_arms_share_one_quantized_copy(stories_path):
    engine = Engine.from_pretrained(stories_path, "auto", progress=False)
    quant = engine.arm_engines["quant"].drafter
    assert engine.arm_engines["pld+quant"].drafter.second is quant
    assert all(e.target is engine.target for e in engine.arm_engines.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_is_lossless(tiny_models, arch):
    engine = Engine.from_pretrained(tiny_models[arch], "auto", arms="pld,suffix,quant", progress=False)
    gen = torch.Generator().manual_seed(5)
    for n in range(4):
        ids = torch.randint(3, 512, (6 + 5 * n,), generator=gen).tolist()
        ids = ids + ids[:5]  # a repeat, so lookup has something to find
        assert engine.generate(ids, max_new_tokens=32).token_ids == hf_greedy(str(tiny_models[arch]), tuple(ids), 32)


def test_seeded_sampling_runs_the_first_arm_and_repeats(stories_path):
    engine = Engine.from_pretrained(stories_path, "auto", arms="pld,quant", progress=False)
    runs = [engine.generate(STORY_PROMPTS[1], max_new_tokens=30, temperature=0.8, seed=4) for _ in range(3)]
    assert {r.stats.method["auto.arm"] for r in runs} == {"pld"}
    assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids
    assert engine.chooser.requests == 0  # seeded requests neither choose nor teach


def test_the_chooser_tries_each_arm_then_exploits_and_explores():
    chooser = ArmChooser(["a", "b", "c"], window=3, explore_every=4)
    speeds = {"a": 10.0, "b": 30.0, "c": 20.0}
    picks = []
    for _ in range(12):
        arm = chooser.choose()
        picks.append(arm)
        chooser.record(arm, 100, 100 / speeds[arm])
    assert picks[:3] == ["a", "b", "c"]  # untried first, in order
    exploring = [i for i in range(12) if (i + 1) % 4 == 0]
    assert all(picks[i] == "b" for i in range(3, 12) if i not in exploring)
    assert all(picks[i] != "b" for i in exploring)  # the arm measured longest ago
    assert picks[3] == "a" and picks[7] == "c"


def test_the_chooser_follows_a_change_of_workload():
    chooser = ArmChooser(["a", "b"], window=2, explore_every=3)
    speeds = {"a": 10.0, "b": 20.0}
    for _ in range(6):
        arm = chooser.choose()
        chooser.record(arm, 50, 50 / speeds[arm])
    speeds = {"a": 40.0, "b": 20.0}  # the text changed: a now pays more
    picks = []
    for _ in range(9):  # requests 7..15; every third one explores the other arm
        arm = chooser.choose()
        picks.append((chooser.requests, arm))
        chooser.record(arm, 50, 50 / speeds[arm])
    assert picks[:2] == [(7, "b"), (8, "b")]  # still the old best, until
    assert picks[2] == (9, "a")  # exploring re-measures a,
    assert all(arm == "a" for n, arm in picks[3:] if n % 3)  # which is then chosen


def test_one_token_answers_teach_nothing():
    chooser = ArmChooser(["a"])
    chooser.record("a", 1, 0.001)
    assert chooser.mean("a") is None


@pytest.mark.parametrize(
    "options, name, message",
    [
        ({"arms": "pld,bogus"}, "method", "bogus"),
        ({"arms": "pld,pld"}, "arms", "listed twice"),
        ({"arms": "auto,pld"}, "arms", "cannot be arms"),
        ({"arms": ""}, "arms", "expected methods"),
        ({"arms": "pld,sps"}, "draft_model", "needs a draft model"),
        ({"window": 0}, "window", "positive integer"),
        ({"bits": 8}, "method_options", "auto takes arms"),
    ],
)
def test_bad_options_get_clear_errors(stories_path, options, name, message):
    with pytest.raises(InvalidArgument) as e:
        Engine.from_pretrained(stories_path, "auto", progress=False, **options)
    assert e.value.argument == name and message in str(e.value)


def test_a_draft_model_no_arm_uses_is_refused(stories_path):
    with pytest.raises(InvalidArgument, match="none of auto's arms"):
        Engine.from_pretrained(stories_path, "auto", arms="pld", draft_model=stories_path, progress=False)


def test_bench_takes_hybrids_and_auto():
    specs = parse_methods("vanilla,pld+quant,auto", ["auto.arms=pld,pld+sps"])
    assert [s.name for s in specs] == ["vanilla", "pld+quant", "auto"]
    assert specs[2].needs_draft_model and not specs[1].needs_draft_model
    with pytest.raises(InvalidArgument, match="pld\\+bogus"):
        parse_methods("pld+bogus")
