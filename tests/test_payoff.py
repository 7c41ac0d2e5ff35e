"""The drafting-or-plain decision (drafters/payoff.py), on injected measurements."""

from __future__ import annotations

from specdecode.drafters.payoff import DraftingPayoff


def choices(payoff: DraftingPayoff, steps: int, draft_rate: float, plain_rate: float) -> list[bool]:
    """Run ``steps`` decisions, feeding back one token per step at the given rates."""
    out = []
    for _ in range(steps):
        drafted = payoff.should_draft()
        payoff.record(drafted, 1, 1 / (draft_rate if drafted else plain_rate))
        out.append(drafted)
    return out


def test_drafting_gets_a_trial_first_then_plain_is_measured():
    got = choices(DraftingPayoff(min_samples=4), 8, draft_rate=1.0, plain_rate=2.0)
    assert got == [True] * 4 + [False] * 4


def test_slower_drafting_is_used_only_to_probe():
    payoff = DraftingPayoff(probe_interval=16, min_samples=4)
    got = choices(payoff, 200, draft_rate=1.0, plain_rate=2.0)[8:]
    assert 0 < sum(got) <= len(got) // 16 + 1
    assert payoff.plain_steps == 200 - 4 - sum(got)


def test_faster_drafting_is_kept_and_plain_probed():
    got = choices(DraftingPayoff(probe_interval=16, min_samples=4), 200, draft_rate=3.0, plain_rate=2.0)[8:]
    assert 0 < got.count(False) <= len(got) // 16 + 1


def test_a_change_of_draft_is_retried_and_can_win():
    payoff = DraftingPayoff(probe_interval=16, min_samples=4)
    choices(payoff, 50, draft_rate=1.0, plain_rate=2.0)  # drafting lost
    payoff.forget_drafting()  # e.g. a better skip set was found
    got = choices(payoff, 50, draft_rate=4.0, plain_rate=2.0)
    assert got[:4] == [True] * 4 and sum(got[4:]) >= len(got[4:]) - 50 // 16 - 1


def test_measurements_decay_so_a_change_of_text_is_followed():
    payoff = DraftingPayoff(probe_interval=4, min_samples=2)
    choices(payoff, 40, draft_rate=3.0, plain_rate=2.0)
    late = choices(payoff, 200, draft_rate=1.0, plain_rate=2.0)  # the text got hard to draft
    assert sum(late[-100:]) <= 100 // 4 + 1
