"""Batched speculative decoding (continuous batching) gives every request what it gets alone.

The reference for each request is the same engine's lone ``generate`` (itself tested against
transformers in test_lossless_greedy.py). Greedy: token-identical, float32 on every architecture
and bf16 on stories260K; with mixed prompt lengths, chunked prefill, requests joining mid-stream,
a cancellation, a stop string and an EOS. Sampling: per-request generators (a seeded request
repeats its lone output whatever its neighbours), and a chi-square test that batched speculative
sampling keeps the target's distribution, with a biased verifier that must fail it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import specdecode.verification as verification_module
from specdecode import Engine, InvalidArgument, SamplingParams
from specdecode.backends.batched import BatchedCache, Segment
from specdecode.backends.native import NativeBackend
from specdecode.batching import BatchScheduler, budget_from_cost
from specdecode.costmodel import CostModel
from specdecode.draft import Draft
from specdecode.drafters import Drafter
from specdecode.sampling import probabilities, sample

from .conftest import ARCHS
from .test_lossless_sampling import PROMPT, V, chi_square_p, exact_joint, small_vocab  # noqa: F401 - fixture

STORY_PROMPTS = [
    "Once upon a time, there was a little girl named Lily.",
    "The dog ran to the park. The dog ran to the park. The dog",
    "Tom had a big red ball.",
    "One day, a cat and a bird",
    "Sara said, \"Mom, can I have a cookie?\" Mom said,",
    # a long prompt (> 32 tokens and > the budget): prefilled in chunks
    "Once upon a time, there was a little boy named Tim. Tim liked to play with his ball in the park. "
    "One day, Tim saw a big dog. The dog was brown and happy. Tim and the dog played all day. "
    "Then the sun went down and Tim went home to his mom.",
]


@pytest.fixture(scope="module")
def stories(stories_path):
    return Engine.from_pretrained(stories_path, progress=False)


def lone(engine, prompt, **kw):
    return engine.generate(prompt, **kw)


# ---- the backend ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_forward_equals_lone_forwards(stories_path, dtype):
    """Chains, a tree and prefill chunks (short and long) of several slots in one forward give
    each slot bit for bit the lone forward's logits, and keep() compacts the right slot."""
    target = NativeBackend(stories_path, dtype=dtype)
    cache = BatchedCache(target, 3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g) for n in (5, 40, 12)]
    tree = Draft([7, 8, 9, 10], [-1, 0, -1, 2])
    blocks = [torch.tensor([11, 12, 13]), torch.tensor([5, *tree.tokens]), torch.tensor([20])]
    want = []
    for p, block in zip(prompts, blocks):
        target.reset()
        target.forward(p[:-1], logits_rows=None)
        start = target.length
        if block.shape[0] == 5:
            pos = torch.tensor([0] + tree.depths()) + start
            want.append(target.forward(block, positions=pos, tree_mask=tree.tree_mask()))
            target.keep(start, [0, 3, 4])
            want.append(target.forward(torch.tensor([30])))
        else:
            want.append(target.forward(block))
    slots = [cache.allocate() for _ in prompts]
    cache.forward([Segment(s, p[:-1], logits=False) for s, p in zip(slots, prompts)])
    start = cache.lengths[slots[1]]
    segs = [Segment(slots[0], blocks[0]),
            Segment(slots[1], blocks[1], positions=torch.tensor([0] + tree.depths()) + start, tree_mask=tree.tree_mask()),
            Segment(slots[2], blocks[2])]  # fmt: skip
    got = cache.forward(segs)
    cache.keep(slots[1], start, [0, 3, 4])
    got_after = cache.forward([Segment(slots[1], torch.tensor([30]))])[0]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[3])
    assert torch.equal(got_after, want[2])
    assert cache.lengths == [4 + 3, 39 + 4, 11 + 1]


def test_hf_backend_and_model_methods_are_refused(stories_path, noisy_stories):
    hf = Engine.from_pretrained(stories_path, "pld", backend="hf", dtype="float32", progress=False)
    with pytest.raises(InvalidArgument, match="native backend"):
        hf.generate_batch(["Tom had"], max_new_tokens=4)
    swift = Engine.from_pretrained(stories_path, "swift", progress=False)  # a skip set tuned on one sequence
    with pytest.raises(InvalidArgument, match="swift"):
        swift.batch()


# ---- every method batched: sps (a cache per request over one draft model), quant and pld+quant
# (one quantized copy drafting over each request's own slot), rest (one datastore) --------------


@pytest.mark.parametrize("method", ["sps", "quant", "pld+quant", "pld+sps"])
def test_model_drafters_batch_equals_lone(stories_path, noisy_stories, method):
    draft = noisy_stories if "sps" in method else None
    engine = Engine.from_pretrained(stories_path, method, draft_model=draft, progress=False)
    want = [lone(engine, p, max_new_tokens=40) for p in STORY_PROMPTS]
    got = engine.generate_batch(STORY_PROMPTS, max_new_tokens=40, max_num_seqs=3, max_batch_tokens=20)
    assert [r.token_ids for r in got] == [w.token_ids for w in want]
    assert sum(r.stats.accepted_draft_tokens for r in got) > 0  # speculation happened
    assert all(r.stats.method.get("batched") for r in got)


def test_model_drafters_batch_equals_lone_in_bf16_bit_for_bit(stories_path):
    engine = Engine.from_pretrained(stories_path, "pld+quant", dtype="bfloat16", progress=False)
    prompts = STORY_PROMPTS[:4]
    want = [engine.generate(p, max_new_tokens=48).token_ids for p in prompts]
    got = engine.generate_batch(prompts, max_new_tokens=48, max_num_seqs=4, max_batch_tokens=96)
    assert [r.token_ids for r in got] == want


def test_rest_batch_equals_lone(stories_path, tmp_path):
    from specdecode.datastore import build_datastore

    engine = Engine.from_pretrained(stories_path, "pld", progress=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(STORY_PROMPTS * 3))
    build_datastore(corpus, tmp_path / "ds", engine.tokenizer, "stories")
    rest = engine.with_method("rest", datastore=str(tmp_path / "ds"), progress=False)
    want = [rest.generate(p, max_new_tokens=32).token_ids for p in STORY_PROMPTS]
    got = rest.generate_batch(STORY_PROMPTS, max_new_tokens=32, max_num_seqs=3, max_batch_tokens=20)
    assert [r.token_ids for r in got] == want


# ---- greedy: batched == alone ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["vanilla", "pld", "suffix", "recycle", "lookahead"])
def test_stories_batch_equals_lone(stories, method):
    engine = stories.with_method(method, progress=False)
    want = [lone(engine, p, max_new_tokens=48) for p in STORY_PROMPTS]
    # 3 slots for 6 prompts: the later ones join as earlier ones finish; a budget of 20 tokens
    # splits the long prompt's prefill into chunks and limits the drafts.
    got = engine.generate_batch(STORY_PROMPTS, max_new_tokens=48, max_num_seqs=3, max_batch_tokens=20)
    for w, r in zip(want, got):
        assert r.token_ids == w.token_ids and r.text == w.text and r.finish_reason == w.finish_reason
        assert sum(r.stats.accept_lengths) == len(r.token_ids)
    if method != "vanilla":
        assert sum(r.stats.accepted_draft_tokens for r in got) > 0  # speculation happened
        assert any(r.stats.target_forwards < len(r.token_ids) for r in got)


def test_quantized_target_and_hybrid_batch_equals_lone(stories_path):
    engine = Engine.from_pretrained(stories_path, "pld", quantize="int8", progress=False)
    for e in (engine, engine.with_method("pld+recycle", progress=False)):
        want = [e.generate(p, max_new_tokens=32).token_ids for p in STORY_PROMPTS]
        got = e.generate_batch(STORY_PROMPTS, max_new_tokens=32, max_num_seqs=3, max_batch_tokens=20)
        assert [r.token_ids for r in got] == want


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_architectures_batch_equals_lone(tiny_models, arch):
    engine = Engine.from_pretrained(tiny_models[arch], "pld", progress=False)
    gen = torch.Generator().manual_seed(ARCHS.index(arch))
    prompts = []
    for n in range(4):
        ids = torch.randint(3, 512, (5 + 11 * n,), generator=gen).tolist()
        prompts.append(ids + ids[:6])  # a repeat, so prompt lookup finds matches
    want = [engine.generate(p, max_new_tokens=40).token_ids for p in prompts]
    got = engine.generate_batch(prompts, max_new_tokens=40, max_num_seqs=3, max_batch_tokens=24)
    assert [r.token_ids for r in got] == want


def test_bf16_batch_equals_lone_bit_for_bit(stories_path):
    """bf16: rows of a batched forward are computed in the chunks the row-invariance check
    vouched for, so each request's greedy output repeats its lone output exactly (prompts
    prefilled in one piece: the budget holds them)."""
    engine = Engine.from_pretrained(stories_path, "pld", dtype="bfloat16", progress=False)
    prompts = STORY_PROMPTS[:5]
    want = [engine.generate(p, max_new_tokens=64).token_ids for p in prompts]
    got = engine.generate_batch(prompts, max_new_tokens=64, max_num_seqs=5, max_batch_tokens=96)
    assert [r.token_ids for r in got] == want


class _ConfidentDrafter(Drafter):
    """Drafts the lone output's next tokens (right for ``right`` of them), with a confidence."""

    name = "test-oracle"
    batchable = True

    def __init__(self, answers: dict[tuple, list[int]], right: int = 100, confidence: dict | None = None):
        self.answers, self.right, self.conf = answers, right, confidence or {}
        self.key = None

    def begin(self, prompt_ids):
        self.key, self.n = tuple(prompt_ids), len(prompt_ids)

    def propose(self, tokens, max_tokens, params, generator):
        ans = self.answers.get(self.key, [])
        done = len(tokens) - self.n
        out = [t if i < self.right else (t + 1) % 512 for i, t in enumerate(ans[done : done + max_tokens])]
        c = self.conf.get(self.key)
        return Draft.chain(out, confidence=None if c is None else [c] * len(out))


class _TreeOracle(_ConfidentDrafter):
    """A tree whose first branch is wrong and whose second is right: every accepted path needs
    the cache compacted (keep with rows that are not a prefix)."""

    name = "test-tree"

    def propose(self, tokens, max_tokens, params, generator):
        ans = self.answers.get(self.key, [])
        done = len(tokens) - self.n
        right = ans[done : done + max(0, max_tokens - 1)]
        if not right:
            return Draft()
        return Draft([(right[0] + 1) % 512] + right, [-1] + list(range(-1, len(right) - 1)))


def test_tree_drafts_with_compaction(stories):
    prompts = STORY_PROMPTS[:4]
    ref = {tuple(stories.encode(p)): stories.generate(p, max_new_tokens=30).token_ids for p in prompts}
    engine = Engine(stories.target, stories.tokenizer, _TreeOracle(ref), draft_length=5)
    want = [engine.generate(p, max_new_tokens=30) for p in prompts]
    got = engine.generate_batch(prompts, max_new_tokens=30, max_num_seqs=4, max_batch_tokens=24)
    assert [r.token_ids for r in got] == [w.token_ids for w in want] == [ref[tuple(stories.encode(p))] for p in prompts]
    assert all(r.stats.accepted_draft_tokens > 0 for r in got)


def test_join_cancel_stop_and_eos_mid_stream(stories):
    """The incremental API: requests join while others run; one is cancelled midway, one ends at
    a stop string, one at an EOS inside an accepted draft; each is what it is alone."""
    tok = stories.tokenizer
    prompts = STORY_PROMPTS[:4] + [STORY_PROMPTS[5]]
    ref = {p: stories.generate(p, max_new_tokens=40) for p in prompts}
    stop_text = ref[prompts[1]].text[20:24]  # a stop string the second request meets
    others = {t for p in prompts if p != prompts[3] for t in ref[p].token_ids}
    # pretend this token (one no other request produces) is an end of text
    eos_tok = next(t for t in ref[prompts[3]].token_ids[10:] if t not in others)
    answers = {tuple(stories.encode(p)): ref[p].token_ids for p in prompts}
    engine = Engine(stories.target, tok, _ConfidentDrafter(answers), draft_length=6)
    engine.eos_ids = set(stories.eos_ids) | {eos_tok}
    want = {p: engine.generate(p, max_new_tokens=40) for p in prompts}  # alone, with the same EOS
    want_stop = engine.generate(prompts[1], max_new_tokens=40, stop=stop_text)
    want_eos = want[prompts[3]]
    assert want_stop.finish_reason == "stop" and want_eos.finish_reason == "stop"
    assert want[prompts[0]].finish_reason == "length"
    assert want_eos.token_ids[-1] == eos_tok

    sched = engine.batch(max_num_seqs=3, max_batch_tokens=24)
    a = sched.submit(prompts[0], max_new_tokens=40)
    b = sched.submit(prompts[1], max_new_tokens=40, stop=stop_text)
    texts = {}
    for _ in range(2):
        for out in sched.step():
            texts[out.request.id] = texts.get(out.request.id, "") + out.text
    c = sched.submit(prompts[2], max_new_tokens=40)  # joins mid-stream
    d = sched.submit(prompts[3], max_new_tokens=40)  # waits for a slot
    e = sched.submit(prompts[4], max_new_tokens=40)
    steps = 0
    while sched.has_work:
        for out in sched.step():
            texts[out.request.id] = texts.get(out.request.id, "") + out.text
        steps += 1
        if steps == 2:
            assert not a.finished
            sched.cancel(a)
    assert a.result.finish_reason == "cancelled"
    assert 0 < len(a.result.token_ids) < 40 and want[prompts[0]].token_ids[: len(a.result.token_ids)] == a.result.token_ids
    assert b.result.token_ids == want_stop.token_ids and b.result.text == want_stop.text
    assert b.result.finish_reason == "stop" and stop_text not in b.result.text
    assert c.result.token_ids == want[prompts[2]].token_ids
    assert d.result.token_ids == want_eos.token_ids and d.result.finish_reason == "stop"
    assert max(d.result.stats.accept_lengths) > 1  # EOS arrived inside a multi-token step
    assert e.result.token_ids == want[prompts[4]].token_ids
    for h in (b, c, d, e):
        assert texts[h.id] == h.result.text  # streamed pieces add up to the text
    assert sched.cache.free_slots == 3


def test_cancel_before_joining(stories):
    engine = stories.with_method("pld", progress=False)
    sched = engine.batch(max_num_seqs=1, max_batch_tokens=16)
    a = sched.submit(STORY_PROMPTS[0], max_new_tokens=8)
    b = sched.submit(STORY_PROMPTS[2], max_new_tokens=8)
    sched.cancel(b)
    sched.run()
    assert b.result.finish_reason == "cancelled" and b.result.token_ids == []
    assert a.result.token_ids == engine.generate(STORY_PROMPTS[0], max_new_tokens=8).token_ids


# ---- the scheduler -----------------------------------------------------------------------------


def _oracle_engine(stories, prompts, n=30, **kw):
    ref = {tuple(stories.encode(p)): stories.generate(p, max_new_tokens=n).token_ids for p in prompts}
    return Engine(stories.target, stories.tokenizer, _ConfidentDrafter(ref, **kw), draft_length=6), ref


def test_chunked_prefill_keeps_the_others_decoding(stories):
    short, long_ = STORY_PROMPTS[2], STORY_PROMPTS[5]
    engine, ref = _oracle_engine(stories, [short, long_])
    sched = engine.batch(max_num_seqs=2, max_batch_tokens=12, prefill_chunk=10)
    a = sched.submit(short, max_new_tokens=30)
    sched.step()  # a prefills
    b = sched.submit(long_, max_new_tokens=30)
    prefill_steps = alongside = 0
    while b.status in ("waiting", "prefill"):
        sched.step()
        info = sched.last_step
        assert info["tokens"] - info["prefill"] <= 12 and info["prefill"] <= 10
        if info["per_request"].get(b.id, ("", 0))[0] == "prefill":
            prefill_steps += 1
            assert info["per_request"][b.id][1] <= 10
            alongside += info["per_request"].get(a.id, ("", 0))[0] == "decode"  # a keeps decoding meanwhile
    assert prefill_steps >= 3 and alongside >= 2
    sched.run()
    assert a.result.token_ids == ref[tuple(stories.encode(short))]
    assert b.result.token_ids == ref[tuple(stories.encode(long_))]


def test_budget_goes_to_the_most_confident_draft(stories):
    p, q = STORY_PROMPTS[0], STORY_PROMPTS[2]
    pid, qid = tuple(stories.encode(p)), tuple(stories.encode(q))
    engine, _ = _oracle_engine(stories, [p, q], n=60, confidence={pid: 0.9, qid: 0.1})
    sched = engine.batch(max_num_seqs=2, max_batch_tokens=2 + 4)
    a, b = sched.submit(p, max_new_tokens=60), sched.submit(q, max_new_tokens=60)
    while a.status != "decode" or b.status != "decode":
        sched.step()
    sched.step()
    info = sched.last_step["per_request"]
    assert info[a.id] == ("decode", 4) and info[b.id] == ("decode", 0)
    assert sched.last_step["tokens"] == 6


def test_speculation_turns_off_when_roots_fill_the_budget(stories):
    prompts = [[1, 300 + 7 * i] for i in range(4)]  # one-token prefills: all four decode soon
    engine, ref = _oracle_engine(stories, prompts)
    sched = engine.batch(max_num_seqs=4, max_batch_tokens=4)
    handles = [sched.submit(p, max_new_tokens=n) for p, n in zip(prompts, (12, 30, 30, 30))]
    full = again = 0
    while sched.has_work:
        sched.step()
        info = sched.last_step
        assert info["tokens"] - info["prefill"] <= 4  # roots and drafts within the budget
        if info["roots"] == 4:
            full += 1
            assert info["drafts"] == 0
        elif full and info["drafts"] > 0:
            again += 1  # a request left: room for drafts again
    assert full >= 3 and again >= 1
    for p, h in zip(prompts, handles):
        assert h.result.token_ids == ref[tuple(stories.encode(p))][: len(h.result.token_ids)]
        assert len(h.result.token_ids) in (12, 30)


def test_default_budget_from_the_cost_curve():
    flat = CostModel.from_curve({1: 1.0, 8: 1.1, 16: 1.3, 32: 1.6})
    assert budget_from_cost(flat, context=0) == 53  # 1.6 at 32, then +0.3 per 16 tokens: 2.0 at 53
    steep = CostModel.from_curve({1: 1.0, 2: 1.9, 4: 3.8})
    assert budget_from_cost(steep, context=0) == 16  # the floor
    assert budget_from_cost(CostModel.from_curve({1: 1.0, 32: 1.0}), context=0) == 512  # flat: the ceiling


# ---- sampling ----------------------------------------------------------------------------------


def test_seeded_request_repeats_its_lone_output_whatever_its_neighbours(stories):
    engine = stories.with_method("pld", progress=False)
    p = STORY_PROMPTS[1]
    want = engine.generate(p, max_new_tokens=40, temperature=0.8, seed=7).token_ids
    for others in ([], STORY_PROMPTS[2:4], STORY_PROMPTS[3:6]):
        got = engine.generate_batch([p] + others, max_new_tokens=40, temperature=[0.8] + [1.0] * len(others),
                                    seed=[7] + list(range(100, 100 + len(others))), max_batch_tokens=64)  # fmt: skip
        assert got[0].token_ids == want
    assert got[0].stats.accepted_draft_tokens > 0


def _batched_joint(engine, params, draws):
    engine.eos_ids = set()
    results = engine.generate_batch(
        [PROMPT] * draws, max_new_tokens=3, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, seed=list(range(draws)), max_num_seqs=128, max_batch_tokens=1024,
    )  # fmt: skip
    counts = np.zeros((V, V))
    drafted = 0
    for r in results:
        counts[r.token_ids[0], r.token_ids[1]] += 1
        drafted += r.stats.verified_draft_tokens
    assert drafted > 0  # drafts were verified (and, at this temperature, often rejected)
    return counts


def test_batched_sampling_preserves_the_distribution(small_vocab):  # noqa: F811
    target, _ = small_vocab
    params = SamplingParams(temperature=1.0)
    engine = Engine.from_pretrained(target, "pld", draft_length=4, adaptive=False, progress=False)
    counts = _batched_joint(engine, params, 10_000)
    p = chi_square_p(counts, exact_joint(target, params))
    assert p > 1e-3, f"chi-square p-value {p:.2e}: batched speculative sampling changed the distribution"


def test_the_batched_test_catches_a_biased_verifier(small_vocab, monkeypatch):  # noqa: F811
    target, _ = small_vocab

    def accept_everything(draft, logits, params, generator):
        return list(range(len(draft))), sample(probabilities(logits[len(draft)], params), generator)

    monkeypatch.setattr(verification_module, "verify_sampling", accept_everything)  # the one verification step's
    params = SamplingParams(temperature=1.0)
    engine = Engine.from_pretrained(target, "pld", draft_length=4, adaptive=False, progress=False)
    counts = _batched_joint(engine, params, 3_000)
    assert chi_square_p(counts, exact_joint(target, params)) < 1e-6


def test_scheduler_checks_its_arguments(stories):
    with pytest.raises(InvalidArgument, match="max_num_seqs"):
        BatchScheduler(stories, max_num_seqs=0)
    with pytest.raises(InvalidArgument, match="max_batch_tokens"):
        stories.batch(max_batch_tokens=0)
    with pytest.raises(InvalidArgument, match="prefill_chunk"):
        stories.batch(prefill_chunk=0)
    with pytest.raises(InvalidArgument, match="seed"):
        stories.generate_batch(["a", "b"], seed=[1, 2, 3])
    with pytest.raises(InvalidArgument, match="prompts"):
        stories.generate_batch([])


def test_batched_suffix_requests_join_the_shared_store(stories):
    """A batched request's answer joins the suffix store when it ends, so a later request (in the
    same scheduler, as in the server) finds it, as a lone engine's next request does."""
    engine = stories.with_method("suffix", progress=False)
    prompt = STORY_PROMPTS[0]
    want = engine.generate(prompt, max_new_tokens=60).token_ids
    engine.drafter.forget()
    sched = engine.batch(max_num_seqs=2, max_batch_tokens=32)
    first = sched.submit(prompt, max_new_tokens=60)
    other = sched.submit(STORY_PROMPTS[2], max_new_tokens=60)
    sched.run()
    again = sched.submit(prompt, max_new_tokens=60)
    sched.run()
    assert first.result.token_ids == again.result.token_ids == want
    assert first.result.stats.method["accepted_from_store"] == 0
    assert again.result.stats.method["accepted_from_store"] > 20
    assert again.result.stats.target_forwards < first.result.stats.target_forwards / 3
    assert other.result.token_ids == engine.generate(STORY_PROMPTS[2], max_new_tokens=60).token_ids


@pytest.mark.parametrize("method", ["recycle", "suffix+recycle"])
def test_batched_requests_share_and_teach_the_recycle_table(stories, method):
    """Token recycling's table is shared by every request of a batch, as by a lone engine's
    requests in turn: not copied per request (for a large vocabulary that costs more than a
    step), and what each request's verifications taught it stays for later requests."""
    engine = stories.with_method(method, progress=False)
    engine.drafter.forget()
    table = engine.drafter.table if method == "recycle" else engine.drafter.recycle.table
    sched = engine.batch(max_num_seqs=2, max_batch_tokens=32)
    handles = [sched.submit(p, max_new_tokens=30) for p in STORY_PROMPTS[:2]]
    sched.run()
    assert len(table.rows) > 20  # both requests' verifications were recorded in the engine's table
    for h, p in zip(handles, STORY_PROMPTS[:2]):
        assert h.result.token_ids == engine.generate(p, max_new_tokens=30).token_ids
