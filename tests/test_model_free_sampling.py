"""Lossless sampling for every model-free drafter: their drafts are deterministic (a point mass
per node), and verification accepts a node with the target's probability of its token, trying
siblings on rejection. The joint distribution of the first two sampled tokens must equal the
target's, by a chi-square test over 10k draws per method (as tests/test_lossless_sampling.py,
on a Markov-chain "model" whose distributions are known exactly and whose forwards cost nothing).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import specdecode.verification as verification_module  # where the one verification step takes its verifier
from specdecode import Engine, SamplingParams
from specdecode.datastore import Datastore
from specdecode.drafters import LookaheadDrafter, RecycleDrafter, RestDrafter, SuffixDrafter, SuffixRecycleDrafter
from specdecode.sampling import probabilities, sample

from .markov_backend import CharTokenizer, MarkovBackend
from .test_lossless_sampling import chi_square_p

V = 8
DRAWS = 10_000
PROMPT = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]



@pytest.fixture(autouse=True)
def _grow_shrink_sizing(monkeypatch):
    """These tests assert that drafts are proposed and accepted: size them by the deterministic
    grow/shrink rule, not by payoff (whose timings are noise on a shared test machine)."""
    monkeypatch.setenv("SPECDECODE_SIZING", "adaptive")

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors of 8 numbers: waking a thread pool per op (torch does for some, e.g. tril) costs
    milliseconds on a busy machine, a thousand times the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def exact_joint(backend: MarkovBackend, params: SamplingParams) -> np.ndarray:
    p1 = probabilities(backend.next_logits(PROMPT), params)
    p2 = probabilities(torch.stack([backend.next_logits(PROMPT + [x]) for x in range(V)]), params)
    return (p1[:, None] * p2).numpy().astype(np.float64)


def make_drafter(method: str, tmp_path):
    if method == "suffix":
        return SuffixDrafter()
    if method == "recycle":
        return RecycleDrafter(k=4, branch=3)
    if method == "suffix+recycle":
        return SuffixRecycleDrafter(k=4, recycle_branch=3)
    if method == "lookahead":
        return LookaheadDrafter(window=3, ngram=3, guesses=3)
    if method == "rest":
        rng = np.random.default_rng(0)
        docs = [PROMPT + [int(x) for x in rng.integers(0, V, 6)] for _ in range(20)]
        Datastore.from_documents(docs).save(tmp_path / "ds")
        return RestDrafter(datastore=str(tmp_path / "ds"), min_match=1, min_prob=0.0)
    raise ValueError(method)


def draw(engine: Engine, params: SamplingParams, draws: int) -> tuple[np.ndarray, int, int]:
    counts = np.zeros((V, V))
    drafted = accepted = 0
    for seed in range(draws):
        r = engine.generate(PROMPT, max_new_tokens=2, temperature=params.temperature, top_p=params.top_p,
                            top_k=params.top_k, seed=seed)  # fmt: skip
        counts[r.token_ids[0], r.token_ids[1]] += 1
        drafted += r.stats.drafted_tokens
        accepted += r.stats.accepted_draft_tokens
    return counts, drafted, accepted


SETTINGS = [
    ("suffix", SamplingParams(temperature=1.0)),
    ("recycle", SamplingParams(temperature=0.8, top_p=0.9)),
    ("suffix+recycle", SamplingParams(temperature=1.0, top_k=5)),
    ("lookahead", SamplingParams(temperature=1.0)),
    ("rest", SamplingParams(temperature=1.2, top_k=6, top_p=0.95)),
]


@pytest.mark.parametrize("method,params", SETTINGS, ids=[m for m, _ in SETTINGS])
def test_model_free_sampling_preserves_the_distribution(tmp_path, method, params):
    backend = MarkovBackend(V, seed=3)
    engine = Engine(backend, CharTokenizer(), make_drafter(method, tmp_path), eos_ids=set())
    counts, drafted, accepted = draw(engine, params, DRAWS)
    p = chi_square_p(counts, exact_joint(backend, params))
    assert p > 1e-3, f"{method}: chi-square p-value {p:.2e}: sampling changed the distribution"
    # Not a vacuous pass: drafts were made, and both accepted and rejected.
    assert 0 < accepted < drafted


def test_the_harness_catches_a_biased_verifier(tmp_path, monkeypatch):
    def accept_everything(draft, logits, params, generator):
        path, node = [], -1
        kids = draft.children()
        while kids.get(node):
            node = kids[node][0]
            path.append(node)
        return path, sample(probabilities(logits[node + 1], params), generator)

    monkeypatch.setattr(verification_module, "verify_sampling", accept_everything)
    backend = MarkovBackend(V, seed=3)
    params = SamplingParams(temperature=1.0)
    engine = Engine(backend, CharTokenizer(), make_drafter("suffix", tmp_path), eos_ids=set())
    counts, _, _ = draw(engine, params, 3000)
    assert chi_square_p(counts, exact_joint(backend, params)) < 1e-6
