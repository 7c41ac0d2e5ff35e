"""Weight-only int4/int8 quantization: the format's error bounds, the ``quant`` self-drafting
method (lossless: greedy and sampling), a quantized target (``quantize=``) against which every
method is exact, quantized sps draft models (``draft_quant=``), and bad options."""

from __future__ import annotations

import pytest
import torch

from specdecode import Engine, InvalidArgument, SamplingParams
from specdecode.backends import quant
from specdecode.backends.quant import QuantConfig, QuantLinear, dequantize_int4, quantize_int4, quantize_int8

from .conftest import ARCHS, make_tiny_model
from .test_lossless_greedy import STORY_PROMPTS, encode, hf_greedy
from .test_lossless_sampling import chi_square_p, exact_joint, joint_counts

WIDE = (2, 3, 3, 4)



@pytest.fixture(autouse=True)
def _grow_shrink_sizing(monkeypatch):
    """These tests assert that drafts are proposed and accepted: size them by the deterministic
    grow/shrink rule, not by payoff (whose timings are noise on a shared test machine)."""
    monkeypatch.setenv("SPECDECODE_SIZING", "adaptive")

def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    w[3] = 0  # an all-zero row: its groups have no range
    w[5, :7] *= 50  # an outlier
    return w


# ---- the format ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_round_trip_is_within_half_a_step(dtype, group):
    w = _weight(40, 200)  # neither size a multiple of the kernel's: padded
    q, sz = quantize_int4(w, group, dtype)
    kp = -(-200 // group) * group
    assert q.shape == (48, kp) and sz.shape == (kp // group, 48, 2) and sz.dtype == dtype
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    deq = dequantize_int4(q, sz, group)
    scale = sz[..., 0].float().t().repeat_interleave(group, dim=1)  # [N', K']
    zero = sz[..., 1].float().t().repeat_interleave(group, dim=1)
    err = (deq[:40, :200] - w).abs()
    # Half a step, plus (in bf16) the grid's offset rounded to 8 bits.
    slack = 2.0**-8 * zero.abs() if dtype == torch.bfloat16 else 1e-6 * zero.abs()
    assert bool((err <= scale[:40, :200] * 0.5 * (1 + 1e-5) + slack[:40, :200] + 1e-6).all())
    assert float(deq[3].abs().max()) == 0.0  # zeros stay zero
    assert float(deq[40:].abs().max()) == 0.0  # padded rows are zero (padded columns meet zero inputs)
    # 16 levels over the group's range: the step is range / 15.
    span = w[:40, :group].amax(1) - w[:40, :group].amin(1)
    assert torch.allclose(scale[:40, 0], span / 15, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_round_trip_is_within_half_a_step(dtype):
    w = _weight(40, 200)
    q, s = quantize_int8(w, dtype)
    assert q.dtype == torch.int8 and q.shape == (40, 208) and s.shape == (40,)
    deq = q.float() * s.float()[:, None]
    err = (deq[:, :200] - w).abs()
    assert bool((err <= s.float()[:, None] * 0.5 * (1 + 1e-5) + 1e-7).all())
    assert float((deq[:, :200] - w).abs().max() / w.abs().max()) < 1 / 200  # 8 bits: < 0.5% of the range


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_kernel_and_fallback_agree_with_the_reference(bits, dtype, monkeypatch):
    w, bias = _weight(40, 172).to(dtype), torch.randn(40).to(dtype)
    x = torch.randn(5, 172, generator=torch.Generator().manual_seed(1)).to(dtype)
    fast = QuantLinear(w, bias, bits, 32 if bits == 4 else None)
    monkeypatch.setattr(quant, "_kernel_works", lambda *a: False)
    slow = QuantLinear(w, bias, bits, 32 if bits == 4 else None)
    assert fast.fast and not slow.fast  # this CPU has the packed kernels
    ref = x.float() @ slow.dequantized().float().t() + bias.float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for lin in (fast, slow):
        y = lin(x)
        assert y.shape == (5, 40) and y.dtype == dtype
        assert torch.allclose(y.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    assert torch.allclose(fast.dequantized().float(), slow.dequantized().float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_memory_is_a_fraction_of_the_full_weights():
    w = torch.randn(256, 512).bfloat16()
    int4 = QuantLinear(w, None, 4, 128)
    int8 = QuantLinear(w, None, 8)
    full = w.numel() * 2
    assert int4.nbytes == 256 * 512 // 2 + (512 // 128) * 256 * 2 * 2  # nibbles + bf16 scale and offset
    assert int8.nbytes == 256 * 512 + 256 * 2
    assert int4.nbytes < 0.27 * full and int8.nbytes < 0.51 * full
    assert int4.weight is None and int4.source is None  # no full-precision copy kept


# ---- the quant method: lossless -----------------------------------------------------------------


@pytest.fixture(scope="module")
def stories32(stories_path):
    return Engine.from_pretrained(stories_path, dtype="float32", progress=False)


@pytest.mark.parametrize(
    "options",
    [{}, {"bits": 8}, {"branches": WIDE}, {"cache": "own", "branches": WIDE},
     {"group_size": 64, "keep_layers": [0, -1], "quantize_lm_head": True}],
    ids=["int4-chain", "int8", "int4-tree", "own-cache-tree", "kept-layers-head"],
)
def test_stories_greedy_equals_transformers(stories_path, stories32, options):
    engine = stories32.with_method("quant", **options)
    trees = rejected = 0
    for prompt in STORY_PROMPTS[:2]:
        ref = hf_greedy(str(stories_path), encode(stories_path, prompt), 60)
        got = engine.generate(prompt, max_new_tokens=60)
        assert got.token_ids == ref, (options, prompt)
        assert got.stats.accepted_draft_tokens > 0
        rejected += got.stats.drafted_tokens > got.stats.accepted_draft_tokens
        trees += got.stats.drafted_tokens > got.stats.method["draft_forwards"]
    assert got.stats.method["quant_bytes"] > 0
    if options.get("bits") != 8:
        assert rejected > 0  # int4 of a 260K-parameter model is often wrong: rejections are exercised
    if "branches" in options:
        assert trees > 0  # siblings were drafted


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_is_lossless(tiny_models, arch):
    engine = Engine.from_pretrained(tiny_models[arch], "quant", branches=WIDE, progress=False)
    gen = torch.Generator().manual_seed(5)
    for n in range(2):
        ids = tuple(torch.randint(3, 512, (6 + 9 * n,), generator=gen).tolist())
        assert engine.generate(list(ids), max_new_tokens=40).token_ids == hf_greedy(str(tiny_models[arch]), ids, 40)


def test_bf16_quant_equals_bf16_plain(stories_path):
    base = Engine.from_pretrained(stories_path, dtype="bfloat16", progress=False)
    engines = [base.with_method("quant"), base.with_method("quant", branches=WIDE, bits=8)]
    for prompt in STORY_PROMPTS[:3]:
        ref = base.generate(prompt, max_new_tokens=80).token_ids
        for e in engines:
            assert e.generate(prompt, max_new_tokens=80).token_ids == ref, prompt


def test_drafts_leave_the_cache_and_come_best_first(stories32):
    engine = stories32.with_method("quant", branches=WIDE, stop_below=0.0)
    target = engine.target
    tokens = engine.encode(STORY_PROMPTS[0])
    target.reset()
    target.forward(torch.tensor(tokens[:-1]), logits_rows=None)
    before = target.k_cache[:, :, : target.length].clone()
    draft = engine.drafter.propose(tokens, 12, SamplingParams(), None)
    assert target.length == len(tokens) - 1
    assert torch.equal(target.k_cache[:, :, : target.length], before)
    assert len(draft) == 12 and not draft.is_chain
    assert all(p < i for i, p in enumerate(draft.parents))  # parents first
    conf = draft.confidence
    assert conf is not None and all(0 < c <= 1 for c in conf)
    path = []
    for c, p in zip(conf, draft.parents):
        path.append(c * (path[p] if p >= 0 else 1.0))
    assert path == sorted(path, reverse=True)  # best first: any head(k) is the best k-node tree
    # The first node is the quantized model's argmax after the prompt, with its probability.
    logits = target.forward(torch.tensor(tokens[-1:]), weights=engine.drafter.weights)
    target.truncate(len(tokens) - 1)
    assert draft.tokens[0] == int(logits[0].argmax())
    assert conf[0] == pytest.approx(float(logits[0].softmax(-1).max()))


@pytest.fixture
def one_thread():
    """12k tiny generations: one thread each is several times faster than two (no OpenMP
    hand-offs for 8-token vocabularies), more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sampling_preserves_the_distribution(tmp_path_factory, stories_path, one_thread):
    """Drafts sampled from the draft's q (siblings without replacement, each with its own
    distribution), verified with min(1, p/q): the target's joint distribution of two tokens,
    chi-square over 12k draws. Each draft has 2 nodes: where the first token is likely enough
    (stop_below) a chain of 2, else 2 siblings, so both are verified and the stopping rule too.
    (Sorting sampled nodes by their probability, as greedy drafts are, fails this test.)"""
    root = tmp_path_factory.mktemp("quant_small_vocab")
    kw = dict(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    target = make_tiny_model(root / "t", "llama", seed=21, **kw)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    engine = Engine.from_pretrained(target, "quant", branches=(3, 3, 3, 3), draft_length=3, stop_below=0.12, progress=False)
    # The quantized copy of this model nearly equals it; a noisy output layer makes q differ
    # from p, so that rejections and residual distributions are exercised.
    w = engine.target.lm_head.plain()
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    engine.drafter.weights.lm_head = QuantLinear(w + 1.5 * w.std() * noise, None, 4, 32)
    counts = joint_counts(engine, params)
    p = chi_square_p(counts, exact_joint(target, params))
    assert p > 1e-3, f"chi-square p-value {p:.2e}"
    kinds, rejected = set(), 0
    for seed in range(40):
        s = engine.generate([3, 4, 5, 6, 3, 4, 5, 6, 3, 4], max_new_tokens=3, temperature=params.temperature,
                            top_p=params.top_p, seed=seed).stats  # fmt: skip
        kinds.add(s.drafted_tokens == 2 and s.accept_lengths[0] == 3)  # a whole chain of 2 accepted
        rejected += s.accepted_draft_tokens < s.drafted_tokens
    assert kinds == {True, False} and rejected > 5


# ---- a quantized target, quantized sps drafts ---------------------------------------------------


@pytest.mark.parametrize("dtype,quantize", [("bfloat16", "int4"), ("float32", "int8")])
def test_every_method_is_exact_against_the_quantized_model(stories_path, dtype, quantize):
    base = Engine.from_pretrained(stories_path, dtype=dtype, quantize=quantize, progress=False)
    assert base.target.quantized_bytes > 0
    assert {c.kernel for c in base.target.row_checks} >= {"int4-pack-g32" if quantize == "int4" else "int8-pack"}
    plain = Engine.from_pretrained(stories_path, dtype=dtype, progress=False)
    methods = [
        base.with_method("pld"),
        base.with_method("sps", draft_model=stories_path, draft_quant="int4"),
        base.with_method("swift", optimize=False, fallback=False),
        base.with_method("quant", branches=WIDE),
    ]
    differs = 0
    for prompt in STORY_PROMPTS[:2]:
        ref = base.generate(prompt, max_new_tokens=60).token_ids
        differs += ref != plain.generate(prompt, max_new_tokens=60).token_ids
        for e in methods:
            assert e.generate(prompt, max_new_tokens=60).token_ids == ref, (e.method, prompt)
    if quantize == "int4":
        assert differs > 0  # the quantized model is really another model


def test_sps_with_a_quantized_draft_is_lossless(stories_path, stories32, noisy_stories):
    for draft_quant, prompts in (("int4-g64", STORY_PROMPTS[:2]), ("int8", STORY_PROMPTS[2:3])):
        engine = stories32.with_method("sps", draft_model=noisy_stories, draft_quant=draft_quant)
        assert engine.drafter.model.quantized_bytes > 0
        for prompt in prompts:
            ref = hf_greedy(str(stories_path), encode(stories_path, prompt), 60)
            got = engine.generate(prompt, max_new_tokens=60)
            assert got.token_ids == ref
            assert got.stats.accepted_draft_tokens > 0


# ---- bad options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,argument",
    [
        ({"bits": 3}, "bits"),
        ({"bits": "4"}, "bits"),
        ({"group_size": 16}, "group_size"),
        ({"group_size": 100}, "group_size"),
        ({"bits": 8, "group_size": 32}, "group_size"),
        ({"keep_layers": [5]}, "keep_layers"),
        ({"keep_layers": [-6]}, "keep_layers"),
        ({"keep_layers": "first"}, "keep_layers"),
        ({"keep_layers": [1.5]}, "keep_layers"),
        ({"quantize_lm_head": "yes"}, "quantize_lm_head"),
        ({"cache": "private"}, "cache"),
        ({"branches": (1, 2)}, "branches"),
        ({"stop_below": 1.5}, "stop_below"),
        ({"max_depth": 0}, "max_depth"),
    ],
)
def test_bad_options(stories32, options, argument):
    with pytest.raises(InvalidArgument) as e:
        stories32.with_method("quant", **options)
    assert e.value.argument == argument


def test_bad_quantize_arguments(stories_path, stories32):
    for value in ("int5", "int4-g16", "int8-g32", "4", 4):
        with pytest.raises(InvalidArgument) as e:
            QuantConfig.parse(value)
        assert e.value.argument == "quantize"
    with pytest.raises(InvalidArgument) as e:
        Engine.from_pretrained(stories_path, quantize="fp4", progress=False)
    assert e.value.argument == "quantize"
    with pytest.raises(InvalidArgument) as e:
        Engine.from_pretrained(stories_path, backend="hf", quantize="int8", progress=False)
    assert e.value.argument == "quantize"
    with pytest.raises(InvalidArgument) as e:
        stories32.with_method("pld", draft_quant="int4")
    assert e.value.argument == "draft_quant"
    with pytest.raises(InvalidArgument) as e:
        stories32.with_method("sps", draft_model=stories_path, draft_quant="int3")
    assert e.value.argument == "draft_quant"
    with pytest.raises(InvalidArgument, match="native"):
        Engine.from_pretrained(stories_path, "quant", backend="hf", progress=False)
