"""The suffix automaton against brute force, and the cross-request store of suffix drafting."""

from __future__ import annotations

import random

import pytest

from specdecode.drafters.suffix import SuffixDrafter
from specdecode.drafters.suffix_index import Matcher, SuffixAutomaton
from specdecode.drafters.suffix_store import SuffixStore
from specdecode.sampling import SamplingParams



@pytest.fixture(autouse=True)
def _grow_shrink_sizing(monkeypatch):
    """These tests assert that drafts are proposed and accepted: size them by the deterministic
    grow/shrink rule, not by payoff (whose timings are noise on a shared test machine)."""
    monkeypatch.setenv("SPECDECODE_SIZING", "adaptive")

def occurs(needle: list[int], docs: list[list[int]]) -> int:
    """Occurrences of ``needle`` in the documents (brute force)."""
    n = len(needle)
    return sum(1 for d in docs for i in range(len(d) - n + 1) if d[i : i + n] == needle)


def longest_suffix_in(text: list[int], docs: list[list[int]]) -> int:
    best = 0
    for n in range(1, len(text) + 1):
        if occurs(text[-n:], docs):
            best = n
        else:
            break  # a suffix absent means every longer one is absent
    return best


@pytest.mark.parametrize("seed", range(6))
def test_earlier_match_is_the_longest_repeated_suffix(seed):
    rng = random.Random(seed)
    alphabet = rng.choice([2, 3, 5])
    text: list[int] = []
    index = SuffixAutomaton(count_depth=rng.choice([1, 3, 64]))
    index.start_document()
    for _ in range(160):
        text.append(rng.randrange(alphabet))
        index.extend(text[-1])
        _, length = index.earlier_match()
        # An earlier occurrence ends before the last token.
        assert length == longest_suffix_in(text, [text[:-1]]), text


@pytest.mark.parametrize("seed", range(6))
def test_matcher_and_counts_against_brute_force(seed):
    rng = random.Random(100 + seed)
    alphabet = rng.choice([2, 3, 4])
    depth = rng.choice([2, 4, 100])
    docs = [[rng.randrange(alphabet) for _ in range(rng.randrange(1, 60))] for _ in range(rng.randrange(1, 5))]
    index = SuffixAutomaton(count_depth=depth)
    for d in docs:
        index.add_document(d)
    assert index.tokens == sum(map(len, docs))
    assert len(index) <= 2 * index.tokens + 1
    matcher = Matcher(index)
    query: list[int] = []
    for _ in range(120):
        query.append(rng.randrange(alphabet + 1))  # a token never indexed now and then
        matcher.step(query[-1])
        want = longest_suffix_in(query, docs)
        assert matcher.length == want
        if want == 0:
            continue
        match = query[-want:]
        for tok, _, cnt in index.continuations(matcher.state):
            exact = occurs(match + [tok], docs)
            assert exact > 0
            if want + 1 <= depth:  # shallow: exact; deeper: a lower bound
                assert cnt == exact, (match, tok)
            else:
                assert 1 <= cnt <= exact
        # Every token that follows the match somewhere is a continuation.
        followers = {d[i + want] for d in docs for i in range(len(d) - want) if d[i : i + want] == match}
        assert followers == {tok for tok, _, _ in index.continuations(matcher.state)}


def test_documents_do_not_run_into_each_other():
    index = SuffixAutomaton()
    index.add_document([1, 2, 3])
    index.add_document([4, 5])
    m = Matcher(index)
    m.feed([3, 4])
    assert m.length == 1  # "3 4" spans the boundary: only "4" matches


def test_store_evicts_least_recently_used_within_its_bound():
    store = SuffixStore(max_tokens=100)
    ids = [store.add(range(1000 * i, 1000 * i + 30)) for i in range(3)]  # 90 tokens
    store.touch(ids[0])  # the first document was used: the second is now the oldest
    store.add(range(5000, 5030))  # 120 > 100: evict down to 75
    assert store.total <= 75
    assert ids[1] not in store.docs and ids[0] in store.docs and ids[2] not in store.docs
    for i in range(50):
        store.add(range(10_000 + 40 * i, 10_000 + 40 * i + 40))
        assert store.total <= store.max_tokens
        assert store.index.tokens == store.total  # the automaton holds exactly the kept documents
    huge = store.add(range(50_000, 50_500))  # longer than the bound: keeps its end
    assert store.total == 100 and store.docs[huge].tolist() == list(range(50_400, 50_500))


def test_a_later_request_finds_an_earlier_ones_text():
    drafter = SuffixDrafter(store_tokens=10_000, min_prob=0.0)
    greedy = SamplingParams()
    first = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    drafter.begin(first[:4])
    drafter.update(first, 0, drafter.propose(first, 8, greedy, None))  # the request ran to its end
    # A new request, unrelated prompt, that ends with text the first request produced.
    second = [40, 41, 42, 9, 10, 11]
    drafter.begin(second)
    draft = drafter.propose(second, 8, greedy, None)
    assert draft.tokens[:5] == [12, 13, 14, 15, 16]
    assert drafter.matches() == (0, 3)
    drafter.update(second + [12, 13, 99], 2, draft)
    assert drafter.stats()["accepted_from_store"] == 2
    assert drafter.stats()["store_documents"] == 1


def test_without_a_store_nothing_is_remembered():
    drafter = SuffixDrafter(store_tokens=0, min_prob=0.0)
    drafter.begin([1, 2, 3, 4])
    drafter.update([1, 2, 3, 4, 5], 0, drafter.propose([1, 2, 3, 4], 4, SamplingParams(), None))
    drafter.begin([7, 3, 4])
    assert drafter.propose([7, 3, 4], 4, SamplingParams(), None).tokens == []


def test_drafts_are_best_first_trees_with_confidences():
    drafter = SuffixDrafter(store_tokens=0, min_prob=0.0)
    # The longest match is "1 2", after which 3 came four times and 4 once.
    text = [9, 1, 2, 3, 8, 1, 2, 3, 7, 1, 2, 4, 6, 1, 2, 3, 5, 1, 2, 3, 0, 1, 2]
    drafter.begin(text)
    draft = drafter.propose(text, 16, SamplingParams(), None)
    assert draft.tokens[0] == 3 and 4 in draft.tokens
    assert len(draft.confidence) == len(draft) and all(0 < c <= 1 for c in draft.confidence)
    # Parents first, and path probabilities never increase along the node order.
    path = []
    for i, p in enumerate(draft.parents):
        assert p < i
        path.append(draft.confidence[i] * (path[p] if p >= 0 else 1.0))
    assert all(a >= b - 1e-12 for a, b in zip(path, path[1:]))
