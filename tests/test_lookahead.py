"""Lookahead's 2-D window as a token tree: each n-gram it collects is what the target predicts
after that n-gram's own first n - 1 tokens (checked on an order-2 Markov "model", where the
prediction depends on the last two tokens only, so a wrong ancestry shows)."""

from __future__ import annotations

import pytest

import torch

from specdecode import Engine, SamplingParams
from specdecode.drafters import LookaheadDrafter

from .markov_backend import CharTokenizer, MarkovBackend



@pytest.fixture(autouse=True)
def _grow_shrink_sizing(monkeypatch):
    """These tests assert that drafts are proposed and accepted: size them by the deterministic
    grow/shrink rule, not by payoff (whose timings are noise on a shared test machine)."""
    monkeypatch.setenv("SPECDECODE_SIZING", "adaptive")

def test_window_geometry_and_collected_ngrams():
    backend = MarkovBackend(16, seed=5, scale=3.0)
    drafter = LookaheadDrafter(window=4, ngram=4, guesses=2, pool_from_prompt=False)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    drafter.begin(prompt)
    draft = drafter.propose(prompt, 64, SamplingParams(), None)
    # Pool empty: the draft is the window, 3 rows of 4; row 0 a chain from the root, and every
    # other token hangs below the token of the row above at the same index.
    assert len(draft) == 12 and draft.parents[:4] == [-1, 0, 1, 2]
    for j in (1, 2):
        for i in range(4):
            assert draft.parents[4 * j + i] == 4 * (j - 1) + i
    assert draft.depths() == [1, 2, 3, 4, 2, 3, 4, 5, 3, 4, 5, 6]
    rows = [list(r) for r in drafter.rows]
    backend.reset()
    backend.forward(torch.tensor(prompt[:-1]), logits_rows=None)
    start = backend.length
    block = torch.tensor([prompt[-1]] + draft.tokens)
    logits = backend.forward(block, positions=torch.tensor([0] + draft.depths()) + start, tree_mask=draft.tree_mask())
    drafter.observe(prompt[-1], draft, logits)
    for i in range(4):
        diagonal = [rows[j][i] for j in range(3)]
        # The node (2, i) sees the root, row 0 up to index i, then the diagonal: its context ends
        # with the diagonal's last two tokens, and so does the n-gram's prediction.
        want = int(backend.next_logits(diagonal).argmax())
        assert diagonal[1:] + [want] in [[*rest] for rest in drafter.pool[diagonal[0]]]
        assert drafter.rows[-1][i] == want
    assert drafter.rows[:2] == rows[1:]  # the rows moved up


def test_lookahead_is_exact_on_the_markov_model():
    backend = MarkovBackend(16, seed=6, scale=3.0)
    plain = Engine(backend, CharTokenizer(), LookaheadDrafter(), eos_ids=set()).with_method("vanilla")
    engine = Engine(backend, CharTokenizer(), LookaheadDrafter(window=4, ngram=3, guesses=3), eos_ids=set())
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 5]
    ref = plain.generate(prompt, max_new_tokens=100).token_ids
    got = engine.generate(prompt, max_new_tokens=100)
    assert got.token_ids == ref
    assert got.stats.accepted_draft_tokens > 10  # a Markov chain repeats: the pool pays here
