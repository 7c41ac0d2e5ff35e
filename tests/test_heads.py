"""Trained draft heads (eagle, medusa, specdec-drafter): lossless whatever the head, consistent
between training and drafting, batched like every method, and read back from the published
layouts (EAGLE-1/2, EAGLE-3 / SpecForge, vLLM speculators, Medusa-1).

A head is trained here for a few seconds on stories260K's own text so that its drafts are often
accepted: an exactness test over drafts that are all rejected would prove nothing, so each test
checks that drafts were accepted too.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from specdecode import Engine, SamplingParams
from specdecode.errors import InvalidArgument
from specdecode.heads.model import HeadConfig, eagle3_layers
from specdecode.heads.store import load_head, save_head
from specdecode.heads.train import TrainSettings, draft_vocabulary, extract_features, load_features, new_head, train_head

from .test_lossless_sampling import PROMPT, V, chi_square_p, exact_joint, joint_counts, small_vocab  # noqa: F401 (a fixture)

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "One day, a bird"]
METHOD = {"eagle3": "eagle", "eagle1": "eagle", "specdec": "specdec-drafter", "medusa": "medusa"}


@pytest.fixture(scope="module")
def stories_engine(stories_path):
    return Engine.from_pretrained(stories_path, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def features(stories_engine, tmp_path_factory):
    """The target's own stories (greedy and sampled), their hidden states and argmax."""
    eng = stories_engine
    seqs = []
    for i, p in enumerate(PROMPTS * 6):
        ids = eng.encode(p)
        r = eng.generate(ids, max_new_tokens=120, temperature=0.0 if i < 4 else 0.8, seed=i)
        seqs.append(ids + r.token_ids)
    folder = tmp_path_factory.mktemp("features")
    layers = tuple(sorted(set(eagle3_layers(eng.target.num_layers)) | {eng.target.num_layers}))
    extract_features(eng.target, seqs, layers, folder, shard_tokens=1000)
    return layers, load_features(folder)


def trained(kind: str, stories_engine, features, folder, tokens: int = 80_000):
    """A head of ``kind`` trained on ``tokens`` positions of the stories (~75 steps: a few
    seconds on a quiet 2-core machine), saved in ``folder``. Bounded by positions, not seconds,
    so that a busy machine trains the same head, only slower."""
    target = stories_engine.target
    layers, seqs = features
    cfg = HeadConfig.for_target(target, kind, draft_vocab_size=256, blocks=3)
    pick = [layers.index(i) for i in cfg.target_layers]
    seqs = [{"ids": s["ids"], "argmax": s["argmax"], "hidden": s["hidden"][:, pick]} for s in seqs]
    vocab = draft_vocabulary(seqs, cfg.vocab_size, 256)
    head = new_head(target, cfg, vocab)
    settings = TrainSettings(model="stories", kind=kind, prompts=["x"], ttt_steps=2, lr=3e-3, batch_tokens=1024,
                             seq_len=256, dtype="float32", max_tokens=tokens)  # fmt: skip
    train_head(head, seqs, settings, folder, time.time() + 600)
    save_head(head.eval(), folder)
    return folder


@pytest.fixture(scope="module")
def heads(stories_engine, features, tmp_path_factory):
    return {kind: trained(kind, stories_engine, features, tmp_path_factory.mktemp(kind)) for kind in METHOD}


@pytest.mark.parametrize("kind", list(METHOD))
def test_greedy_output_is_the_targets_own(stories_engine, heads, kind):
    eng = stories_engine.with_method(METHOD[kind], drafter=str(heads[kind]), sizing="fixed", draft_length=12)
    accepted = 0
    for p in PROMPTS + ["Tom had a red ball. He"]:
        want = stories_engine.generate(p, max_new_tokens=80)
        got = eng.generate(p, max_new_tokens=80)
        assert got.token_ids == want.token_ids, (kind, p)
        accepted += got.stats.accepted_draft_tokens
    assert accepted > 20, f"{kind}: the head's drafts were almost never accepted ({accepted}): the test would be vacuous"


@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
def test_batched_answers_equal_lone_answers(stories_engine, heads, kind):
    eng = stories_engine.with_method(METHOD[kind], drafter=str(heads[kind]))
    lone = [eng.generate(p, max_new_tokens=40).token_ids for p in PROMPTS]
    batch = eng.generate_batch(PROMPTS, max_new_tokens=40, max_num_seqs=3)
    assert [r.token_ids for r in batch] == lone
    assert sum(r.stats.accepted_draft_tokens for r in batch) > 0


def test_drafting_sees_what_training_computed(stories_engine, heads, features):
    """The drafter's first two depths on a stored sequence equal the training unroll's logits at
    that position: the cache, positions and masks of drafting are the ones training assumes."""
    target = stories_engine.target
    head = load_head(heads["eagle3"], target)
    layers, seqs = features
    pick = [layers.index(i) for i in head.cfg.target_layers]
    s = seqs[0]
    ids = s["ids"].long()
    hidden = s["hidden"][:, pick].float()
    n = 40  # the sequence so far: tokens 0..n-1, the target has cached 0..n-2
    with torch.no_grad():
        unrolled = head.unrolled(head.fuse(hidden[: n - 1])[None], ids[1 : n + 1][None], 2)
    from specdecode.drafters.eagle import EagleDrafter

    d = EagleDrafter(head, depth=2, width=1, topk=1)
    d.begin(ids[:n].tolist())
    d.observe_hidden(s["hidden"][: n - 1, pick])
    root_out = d._feed(ids[:n].tolist())
    first = head.logits(root_out)
    assert torch.allclose(first, unrolled[0][0, n - 2], atol=1e-4)
    # Depth 2 along the true next token: the pair (own output, token n) at position n - 1.
    m = d.cache.length
    mask = torch.ones(1, m + 1, dtype=torch.bool)
    out = d._rows(head.embed_tokens(ids[n : n + 1]), root_out[None], [m], mask)
    assert torch.allclose(head.logits(out[0]), unrolled[1][0, n - 2], atol=1e-4)


def test_sampling_keeps_the_targets_distribution(small_vocab, tmp_path):
    """Chi-square on the first two tokens' joint distribution, as test_lossless_sampling does
    for the other methods, on its small-vocabulary model; the head is an untrained one started
    from that target (new_head), whose tree drafts are both accepted and rejected."""
    target_path, _ = small_vocab
    base = Engine.from_pretrained(target_path, progress=False)
    head = new_head(base.target, HeadConfig.for_target(base.target, "eagle3"), torch.arange(V))
    save_head(head, tmp_path / "head")
    eng = base.with_method("eagle", drafter=str(tmp_path / "head"), sizing="fixed", draft_length=6)
    params = SamplingParams(temperature=1.0)
    counts = joint_counts(eng, params, draws=4000)
    p = chi_square_p(counts, exact_joint(target_path, params))
    assert p > 1e-3, f"chi-square p-value {p:.2e}: eagle changed the distribution"
    s = eng.generate(PROMPT, max_new_tokens=3, temperature=1.0, seed=1).stats
    assert s.drafted_tokens > 0


# ---- files: ours and the published layouts -----------------------------------------------------


def proposals(engine, folder, method="eagle"):
    """What ``method`` with the head in ``folder`` decodes on the prompts: tokens, accepted
    draft tokens and accepted lengths per step (the same head proposes the same drafts)."""
    eng = engine.with_method(method, drafter=str(folder), sizing="fixed", draft_length=10)
    out = []
    for p in PROMPTS:
        r = eng.generate(p, max_new_tokens=30)
        out.append((r.token_ids, r.stats.accepted_draft_tokens, r.stats.accept_lengths))
    return out


def assert_reads_back(engine, original, folder, config: dict, state: dict, weights_file: str = "model.safetensors"):
    """``state`` and ``config`` written to ``folder`` as a published layout hold them, then
    read back into a drafter that decodes exactly as the ``original`` head's."""
    (folder / "config.json").write_text(json.dumps(config))
    if weights_file.endswith(".safetensors"):
        save_file(state, str(folder / weights_file))
    else:
        torch.save(state, str(folder / weights_file))
    assert proposals(engine, original) == proposals(engine, folder)


def _state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors")), json.loads((folder / "config.json").read_text())


def test_eagle3_reference_layout_loads_back(stories_engine, heads, tmp_path):
    """SafeAILab/EAGLE eagle/model/cnets.py (commit cb7e0841): keys midlayer.*, fc, norm, lm_head,
    d2t (int64 offsets) and t2d (bool); config draft_vocab_size; no embed_tokens; read as
    hidden_states[2, L // 2, L - 3]."""
    state, config = _state(heads["eagle3"])
    published = {k: v for k, v in config.items() if k != "specdecode"}
    assert published["architectures"] == ["LlamaForCausalLMEagle3"] and published["draft_vocab_size"] == 256
    assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool and state["t2d"].sum() == 256
    assert {k.split(".")[0] for k in state} >= {"fc", "midlayer", "norm", "lm_head"}
    assert_reads_back(stories_engine, heads["eagle3"], tmp_path, published, state)


def test_speculators_layout_loads_back(stories_engine, heads, tmp_path):
    """vllm-project/speculators src/speculators/models/eagle3 (commit c05b95b3): layers.0.* in place
    of midlayer.*, embed_tokens saved, the nested config (speculators_model_type,
    transformer_layer_config, speculators_config)."""
    state, config = _state(heads["eagle3"])
    target = stories_engine.target
    state = {("layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k): v for k, v in state.items()}
    state["embed_tokens.weight"] = target.embed.clone()
    L = target.num_layers
    spec = {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "draft_vocab_size": 256,
        "transformer_layer_config": {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                                                            "vocab_size")} | {"num_hidden_layers": 1, "model_type": "llama"},
        "eagle_aux_hidden_state_layer_ids": list(eagle3_layers(L)), "norm_before_residual": False,
        "speculators_config": {"algorithm": "eagle3", "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                               "verifier": {"name_or_path": "stories260k"}},
    }  # fmt: skip
    assert_reads_back(stories_engine, heads["eagle3"], tmp_path, spec, state)


def test_eagle1_layout_loads_back(stories_engine, heads, tmp_path):
    """SafeAILab/EAGLE eagle/model/cnets1.py (commit cb7e0841): pytorch_model.bin with
    embed_tokens, fc (with a bias when the config's "bias" is true) over [embedding, feature],
    layers.0.* without an input norm; config a LlamaConfig with num_hidden_layers 1."""
    state, config = _state(heads["eagle1"])
    assert "fc.bias" in state and "layers.0.self_attn.q_proj.weight" in state
    assert not any(k.startswith("layers.0.input_layernorm") for k in state)
    state["embed_tokens.weight"] = stories_engine.target.embed.clone()
    published = {k: v for k, v in config.items() if k != "specdecode"} | {"bias": True}
    assert_reads_back(stories_engine, heads["eagle1"], tmp_path, published, state, "pytorch_model.bin")


def test_medusa_layout_loads_back(stories_engine, tmp_path):
    """FasterDecoding/Medusa medusa/model/medusa_model.py (commit e2a5d20c): heads
    {k}.0.linear.{weight,bias} (ResBlock) and {k}.1.weight (full-vocabulary projection) in
    medusa_lm_head.safetensors; config medusa_num_heads, medusa_num_layers."""
    target = stories_engine.target
    H, V = target.config.hidden_size, target.vocab_size
    g = torch.Generator().manual_seed(0)
    state = {}
    for k in range(3):
        state[f"{k}.0.linear.weight"] = torch.randn(H, H, generator=g) * 0.02
        state[f"{k}.0.linear.bias"] = torch.zeros(H)
        state[f"{k}.1.weight"] = target.lm_head.plain().float().clone()
    save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 1,
                                                      "base_model_name_or_path": "stories260k"}))  # fmt: skip
    head = load_head(tmp_path, target)
    assert head.cfg.kind == "medusa" and head.cfg.blocks == 3 and head.cfg.draft_vocab_size == V
    # Head k on the last hidden state h: lm_head(h + silu(W h + b)).
    h = torch.randn(H, generator=g)
    want = torch.stack([state[f"{k}.1.weight"] @ (h + torch.nn.functional.silu(state[f"{k}.0.linear.weight"] @ h))
                        for k in range(3)])  # fmt: skip
    assert torch.allclose(head(h.to(head.d2t.device)), want, atol=1e-4)
    for p in PROMPTS[:2]:
        assert Engine.with_method(stories_engine, "medusa", drafter=str(tmp_path)).generate(p, max_new_tokens=30).token_ids == \
            stories_engine.generate(p, max_new_tokens=30).token_ids


# ---- errors ----------------------------------------------------------------------------------


def test_no_cached_head_is_a_clear_error(stories_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDECODE_DRAFTERS", str(tmp_path))
    with pytest.raises(InvalidArgument, match="train-drafter") as e:
        stories_engine.with_method("eagle")
    assert e.value.argument == "drafter"


def test_a_head_of_another_kind_or_target_is_refused(stories_engine, heads, tiny_models):
    with pytest.raises(InvalidArgument, match="medusa"):
        stories_engine.with_method("eagle", drafter=str(heads["medusa"]))
    other = Engine.from_pretrained(tiny_models["qwen2"], progress=False)
    with pytest.raises(InvalidArgument, match="trained for a target"):
        other.with_method("eagle", drafter=str(heads["eagle3"]))


def test_the_cached_head_is_found_by_model_name(stories_engine, heads, monkeypatch, tmp_path):
    import shutil

    dest = tmp_path / stories_engine.model_name / "eagle3"
    shutil.copytree(heads["eagle3"], dest)
    monkeypatch.setenv("SPECDECODE_DRAFTERS", str(tmp_path))
    eng = stories_engine.with_method("suffix+eagle")
    assert eng.generate(PROMPTS[0], max_new_tokens=40).token_ids == stories_engine.generate(PROMPTS[0], max_new_tokens=40).token_ids
    from specdecode.heads.store import list_cached

    assert [(m, k) for m, k, _ in list_cached()] == [(stories_engine.model_name, "eagle3")]


def test_train_drafter_checks_its_arguments(tmp_path):
    bench = tmp_path / "spec_bench"
    bench.mkdir()
    (bench / "question.jsonl").write_text('{"turns": ["hi"]}\n')
    with pytest.raises(InvalidArgument, match="never train") as e:
        TrainSettings(model="m", prompts=[str(bench / "question.jsonl")]).check()
    assert e.value.argument == "prompts"
    with pytest.raises(InvalidArgument) as e:
        TrainSettings(model="m", kind="hydra", synthesize=3).check()
    assert e.value.argument == "kind"
    with pytest.raises(InvalidArgument) as e:
        TrainSettings(model="m").check()  # no prompts at all
    assert e.value.argument == "prompts"
    with pytest.raises(InvalidArgument) as e:
        TrainSettings(model="m", synthesize=3, time_budget=0).check()
    assert e.value.argument == "time_budget"


def test_first_user_turn_reads_every_row_shape():
    from specdecode.heads.train import first_user_turn

    assert first_user_turn({"question": "q?", "answer": "a"}) == "q?"
    assert first_user_turn({"turns": ["first", "second"]}) == "first"
    assert first_user_turn({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}) == "u"
    assert first_user_turn({"conversations": [{"from": "human", "value": "h"}]}) == "h"
    assert first_user_turn({"other": 1}) is None
