"""The model-free drafters (suffix, recycle, suffix+recycle, lookahead, rest) end to end: greedy
output token-identical to plain decoding (float32 against transformers; bf16 against our own
bf16 plain decoding), memory across requests, corpora and datastores, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from specdecode import Engine, InvalidArgument
from specdecode.datastore import Datastore, build_datastore, suffix_array

from .conftest import ARCHS
from .test_lossless_greedy import STORY_PROMPTS, encode, hf_greedy

METHODS = ("suffix", "recycle", "suffix+recycle", "lookahead", "rest")



@pytest.fixture(autouse=True)
def _grow_shrink_sizing(monkeypatch):
    """These tests assert that drafts are proposed and accepted: size them by the deterministic
    grow/shrink rule, not by payoff (whose timings are noise on a shared test machine)."""
    monkeypatch.setenv("SPECDECODE_SIZING", "adaptive")

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: with two threads, every small op wakes a thread pool, which on a busy
    machine costs milliseconds each (tree verification then runs 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stories_corpus(tmp_path_factory, stories_path):
    """A corpus of the model's own stories (what REST retrieves from), as jsonl, and its datastore."""
    root = tmp_path_factory.mktemp("corpus")
    engine = Engine.from_pretrained(stories_path, progress=False)
    texts = [p + engine.generate(p, max_new_tokens=60).text for p in ("Lily liked to play.", "The sun was hot.")]
    corpus = root / "stories.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    build_datastore(corpus, root / "ds", engine.tokenizer, "stories260k")
    return corpus, root / "ds"


def options(method: str, corpus) -> dict:
    return {"datastore": str(corpus[1])} if method == "rest" else {}


@pytest.mark.parametrize("method", METHODS)
def test_stories_greedy_matches_transformers(stories_path, stories_corpus, method):
    base = Engine.from_pretrained(stories_path, dtype="float32", progress=False)
    for k in (None, 3):  # the method's draft length, and a short one (drafts cut by the engine)
        engine = base.with_method(method, draft_length=k, **options(method, stories_corpus))
        drafted = accepted = 0
        for prompt in STORY_PROMPTS + ["Lily liked to play."]:
            ref = hf_greedy(str(stories_path), encode(stories_path, prompt), 80)
            got = engine.generate(prompt, max_new_tokens=80)
            assert got.token_ids == ref, (method, k, prompt)
            assert sum(got.stats.accept_lengths) == len(ref)
            drafted += got.stats.drafted_tokens
            accepted += got.stats.accepted_draft_tokens
        assert 0 < accepted < drafted  # drafts were made, and both kept and thrown away


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_architectures_greedy_matches_transformers(tiny_models, stories_corpus, tmp_path, arch):
    path = tiny_models[arch]
    gen = torch.Generator().manual_seed(ARCHS.index(arch))
    prompts = []
    for n in range(2):
        ids = tuple(torch.randint(3, 512, (5 + 9 * n,), generator=gen).tolist())
        prompts.append(ids + ids[:6])  # a repeat, so lookups find matches
    refs = [hf_greedy(str(path), ids, 40) for ids in prompts]
    base = Engine.from_pretrained(path, progress=False)
    build_datastore(stories_corpus[0], tmp_path / "ds", base.tokenizer, arch)  # its own tokenizer's
    for method in METHODS:
        engine = base.with_method(method, draft_length=6 if method != "lookahead" else None, **options(method, (None, tmp_path / "ds")))
        for ids, ref in zip(prompts, refs):
            assert engine.generate(list(ids), max_new_tokens=40).token_ids == ref, (arch, method)


def test_bf16_equals_our_bf16_plain_decoding(stories_path, stories_corpus):
    base = Engine.from_pretrained(stories_path, dtype="bfloat16", progress=False)
    prompts = STORY_PROMPTS[:2]
    refs = [base.generate(p, max_new_tokens=60).token_ids for p in prompts]
    for method in METHODS:
        engine = base.with_method(method, **options(method, stories_corpus))
        for prompt, ref in zip(prompts, refs):
            assert engine.generate(prompt, max_new_tokens=60).token_ids == ref, method


def test_hf_backend_gets_chains(stories_path):
    """The hf backend verifies chains only: the tree drafters fall back to their best path."""
    base = Engine.from_pretrained(stories_path, backend="hf", dtype="float32", progress=False)
    prompt = STORY_PROMPTS[1]
    ref = hf_greedy(str(stories_path), encode(stories_path, prompt), 40)
    for method in ("suffix", "recycle", "suffix+recycle"):
        assert base.with_method(method).generate(prompt, max_new_tokens=40).token_ids == ref
    with pytest.raises(InvalidArgument, match="native"):
        base.with_method("lookahead")


def test_suffix_remembers_earlier_requests_and_reads_a_corpus(stories_path, stories_corpus, tmp_path):
    base = Engine.from_pretrained(stories_path, progress=False)
    prompt = STORY_PROMPTS[0]
    fresh = base.with_method("suffix").generate(prompt, max_new_tokens=60)
    engine = base.with_method("suffix")
    first = engine.generate(prompt, max_new_tokens=60)
    second = engine.generate(prompt, max_new_tokens=60)  # the same request again: the store knows it
    assert first.token_ids == second.token_ids == fresh.token_ids
    assert second.stats.method["accepted_from_store"] > 0
    assert second.stats.target_forwards < first.stats.target_forwards / 3
    # Seeded from a corpus (jsonl, and plain text): the first request already finds it.
    text = tmp_path / "corpus.txt"
    text.write_text("Lily liked to play." + base.generate("Lily liked to play.", max_new_tokens=60).text)
    for corpus in (stories_corpus[0], text):
        seeded = base.with_method("suffix", corpus=str(corpus))
        assert seeded.drafter.store.total > 0
        got = seeded.generate("Lily liked to play.", max_new_tokens=60)
        assert got.stats.method["accepted_from_store"] > 10
    # Without the store, nothing carries over.
    off = base.with_method("suffix", store_tokens=0)
    off.generate(prompt, max_new_tokens=60)
    assert off.generate(prompt, max_new_tokens=60).stats.method["accepted_from_store"] == 0


def test_suffix_store_stays_within_its_bound(stories_path):
    engine = Engine.from_pretrained(stories_path, "suffix", store_tokens=150, progress=False)
    for prompt in STORY_PROMPTS:
        engine.generate(prompt, max_new_tokens=40)
        assert engine.drafter.store.total <= 150
    assert engine.drafter.store.evicted_docs > 0


def test_suffix_array_and_longest_match_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        docs = [rng.integers(0, 3, rng.integers(1, 30)).tolist() for _ in range(rng.integers(1, 4))]
        store = Datastore.from_documents(docs)
        t = store.tokens.tolist()
        brute = sorted(range(len(t)), key=lambda i: [x + 1 for x in t[i:]])  # -1 sorts first
        assert store.array.tolist() == brute
        for _ in range(10):
            context = rng.integers(0, 4, rng.integers(1, 8)).tolist()
            lo, hi, length = store.longest_match(context, max_match=6, min_match=1)
            want = 0
            for n in range(1, min(6, len(context)) + 1):
                pattern = context[-n:]
                if any(d[i : i + n] == pattern for d in docs for i in range(len(d) - n + 1)):
                    want = n
            assert length == want
            if want:
                pattern = context[-want:]
                found = sorted(int(store.array[i]) for i in range(lo, hi))
                assert found == sorted(i for i in range(len(t)) if t[i : i + want] == pattern)
    assert suffix_array(np.zeros(0, dtype=np.int32)).tolist() == []


def test_datastore_cli_and_checks(stories_path, stories_corpus, tmp_path):
    from typer.testing import CliRunner

    from specdecode.cli import app

    out = tmp_path / "ds"
    result = CliRunner().invoke(app, ["datastore", "build", str(stories_corpus[0]), "-o", str(out), "-m", str(stories_path)])
    assert result.exit_code == 0, result.output
    assert "2 documents" in result.output
    engine = Engine.from_pretrained(stories_path, "rest", datastore=str(out), progress=False)
    assert engine.generate("Lily liked to play.", max_new_tokens=30).stats.accepted_draft_tokens > 10
    # Another tokenizer's datastore is refused.
    meta = json.loads((out / "meta.json").read_text())
    meta["tokenizer"] = "something-else"
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InvalidArgument, match="another tokenizer"):
        Engine.from_pretrained(stories_path, "rest", datastore=str(out), progress=False)


@pytest.mark.parametrize(
    "method,opts,argument",
    [
        ("suffix", {"store_tokens": -1}, "store_tokens"),
        ("suffix", {"alpha": 0}, "alpha"),
        ("suffix", {"corpus": "/nonexistent/corpus.txt"}, "corpus"),
        ("suffix", {"corpus": "x", "store_tokens": 0}, "corpus"),
        ("suffix", {"no_such_option": 1}, "method_options"),
        ("recycle", {"k": 0}, "k"),
        ("recycle", {"k": 2, "branch": 3}, "branch"),
        ("suffix+recycle", {"recycle_below": -2}, "recycle_below"),
        ("lookahead", {"window": 0}, "window"),
        ("lookahead", {"ngram": 1}, "ngram"),
        ("lookahead", {"guesses": "many"}, "guesses"),
        ("rest", {}, "datastore"),
        ("rest", {"datastore": "/nonexistent"}, "datastore"),
        ("pld", {"verify": "sloppy"}, "verify"),
        ("pld", {"verify": "specdec", "beta": 0}, "beta"),
        ("pld", {"verify": "specdec", "tau": -1}, "tau"),
        ("pld", {"beta": 2}, "beta"),  # beta without verify=specdec
    ],
)
def test_bad_options_get_clear_errors(stories_path, method, opts, argument):
    with pytest.raises(InvalidArgument) as e:
        Engine.from_pretrained(stories_path, method, progress=False, **opts)
    assert e.value.argument == argument


def test_recycle_learns_from_verification_logits_and_forgets():
    from specdecode.draft import Draft
    from specdecode.drafters import RecycleDrafter
    from specdecode.sampling import SamplingParams

    drafter = RecycleDrafter(k=3, branch=2, min_prob=0.0)
    drafter.begin([1, 2, 5])
    assert drafter.propose([1, 2, 5], 8, SamplingParams(), None).tokens == []  # nothing seen yet
    logits = torch.full((2, 10), -10.0)
    logits[0, 7], logits[0, 3] = 5.0, 4.0  # after 5: 7, then 3
    logits[1, 8] = 6.0  # after 7: 8
    drafter.observe(5, Draft.chain([7]), logits)
    assert [t for t, _ in drafter.table.rows[5]][:2] == [7, 3] and drafter.table.rows[7][0][0] == 8
    draft = drafter.propose([1, 2, 5], 8, SamplingParams(), None)
    assert draft.tokens[:2] == [7, 8] and draft.parents[:2] == [-1, 0]  # best path first
    assert 3 in draft.tokens and draft.parents[draft.tokens.index(3)] == -1
    drafter.forget()
    assert drafter.propose([1, 2, 5], 8, SamplingParams(), None).tokens == []


def test_recycle_leaves_unlikely_candidates_to_the_sizing():
    """Where verifying one more token is free (T(2) = T(1)), even a candidate the target gave
    20% is worth verifying; only the sizing knows the cost curve, so recycle's own floor must
    not drop it (it did at the old 0.15 floor: 0.5 * 0.2 = 0.1 estimated acceptance)."""
    from specdecode.draft import Draft
    from specdecode.drafters import RecycleDrafter
    from specdecode.sampling import SamplingParams

    logits = torch.full((1, 10), 0.0)  # after 5: token 7 a bit likelier than the other nine
    logits[0, 7] = 0.9
    drafter = RecycleDrafter()
    drafter.begin([1, 2, 5])
    drafter.observe(5, Draft(), logits)
    assert drafter.propose([1, 2, 5], 8, SamplingParams(), None).tokens[:1] == [7]
