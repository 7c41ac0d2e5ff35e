"""The native backend computes what transformers computes (float32, tight tolerance)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specdecode.backends import HFBackend, NativeBackend, SkipSet
from specdecode.draft import Draft

from .conftest import ARCHS

TOL = 1e-4


def hf_logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tiny_models, arch):
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (40,))  # longer than mistral's sliding window (24)
    ref = hf_logits(tiny_models[arch], ids)
    nb = NativeBackend(tiny_models[arch])
    # In pieces, as decoding does: a prefill, a block, then single tokens.
    got = torch.cat([nb.forward(ids[:25]), nb.forward(ids[25:37]), nb.forward(ids[37:38]), nb.forward(ids[38:])])
    assert torch.allclose(got, ref, atol=TOL, rtol=0), (got - ref).abs().max()


def test_stories_logits_match_transformers(stories_path):
    ids = torch.arange(3, 200, 3)
    ref = hf_logits(stories_path, ids)
    got = NativeBackend(stories_path).forward(ids)
    assert torch.allclose(got, ref, atol=TOL, rtol=0), (got - ref).abs().max()


def test_hf_backend_matches_and_rolls_back(stories_path):
    ids = torch.arange(5, 60)
    ref = hf_logits(stories_path, ids)
    hb = HFBackend(stories_path, dtype=torch.float32)
    hb.forward(ids[:30], logits_rows=None)
    hb.forward(torch.tensor([7, 8, 9]))  # a rejected draft
    hb.truncate(30)
    got = hb.forward(ids[30:])
    assert torch.allclose(got, ref[30:], atol=TOL, rtol=0)


def test_rollback_and_logits_rows(stories_path):
    nb = NativeBackend(stories_path)
    ids = torch.arange(10, 50)
    full = nb.forward(ids)
    nb.truncate(20)
    assert nb.length == 20
    nb.forward(torch.tensor([1, 2, 3, 4]), logits_rows=None)  # garbage that gets rolled back
    nb.truncate(20)
    last = nb.forward(ids[20:], logits_rows=slice(-1, None))
    assert last.shape == (1, 512)
    assert torch.allclose(last[0], full[-1], atol=TOL, rtol=0)
    with pytest.raises(ValueError):
        nb.truncate(nb.length + 1)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_tree_attention_equals_each_path(tiny_models, arch):
    """Every tree node's logits equal those of its root path run as a plain sequence."""
    nb = NativeBackend(tiny_models[arch])
    prefix = torch.arange(20, 50)  # 30 tokens: the mistral window (24) matters
    # root -> a(0) -> b(1) -> c(2); root -> d(3) -> e(4); a -> f(5)
    draft = Draft(tokens=[11, 12, 13, 14, 15, 16], parents=[-1, 0, 1, -1, 3, 0])
    nb.forward(prefix[:-1], logits_rows=None)
    start = nb.length
    block = torch.tensor([int(prefix[-1])] + draft.tokens)
    positions = torch.tensor([0] + draft.depths()) + start
    tree = nb.forward(block, positions=positions, tree_mask=draft.tree_mask())
    ref_model = NativeBackend(tiny_models[arch])
    for node in range(len(draft)):
        path = []
        n = node
        while n >= 0:
            path.append(draft.tokens[n])
            n = draft.parents[n]
        seq = torch.cat([prefix, torch.tensor(path[::-1])])
        ref_model.reset()
        ref = ref_model.forward(seq, logits_rows=slice(-1, None))[0]
        assert torch.allclose(tree[node + 1], ref, atol=TOL, rtol=0), (node, (tree[node + 1] - ref).abs().max())
    # Keep a path: the cache then equals running that path plainly (root -> d -> e moves
    # entries; root -> a -> b keeps the rows in place, which the leaves' attention must not
    # have disturbed).
    for rows, toks in (([0, 4, 5], [14, 15]), ([0, 1, 2], [11, 12])):
        nb.truncate(start)
        nb.forward(block, positions=positions, tree_mask=draft.tree_mask())
        nb.keep(start, rows)
        nxt = nb.forward(torch.tensor([99]))[0]
        ref_model.reset()
        ref = ref_model.forward(torch.cat([prefix, torch.tensor(toks + [99])]), logits_rows=slice(-1, None))[0]
        assert torch.allclose(nxt, ref, atol=TOL, rtol=0), rows


def test_skipping_every_sublayer_leaves_embedding_only(stories_path):
    nb = NativeBackend(stories_path)
    layers = frozenset(range(nb.config.num_layers))
    ids = torch.tensor([5, 6, 7])
    got = nb.forward(ids, skip=SkipSet(attention=layers, mlp=layers))
    x = nb.embed[ids].float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + nb.config.rms_norm_eps)
    expect = (nb.norm * x) @ nb.lm_head.weight.T
    assert torch.allclose(got, expect, atol=TOL, rtol=0)
    # And skipping nothing differs from skipping one MLP.
    nb.reset()
    full = nb.forward(ids)
    nb.reset()
    part = nb.forward(ids, skip=SkipSet(mlp=frozenset({2})))
    assert not torch.allclose(full, part)


def test_bf16_close_to_float32(stories_path):
    ids = torch.arange(3, 40)
    f32 = NativeBackend(stories_path).forward(ids)
    b16 = NativeBackend(stories_path, dtype=torch.bfloat16).forward(ids)
    assert b16.dtype == torch.float32  # logits always come back in float32
    assert (f32.argmax(-1) == b16.argmax(-1)).float().mean() > 0.8


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory, stories_path):
    """SmolLM2-135M's attention shape (9 heads of 64, 3 KV heads) on 2 small layers: big enough
    for the matmul kernels to change their reduction order with the number of rows."""
    from .conftest import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("wide") / "m", "llama", hidden_size=576, num_attention_heads=9,
                           num_key_value_heads=3, num_hidden_layers=2, intermediate_size=256,
                           max_position_embeddings=2048)  # fmt: skip


def test_bf16_block_logits_equal_one_token_at_a_time(wide_heads):
    """Bitwise, in bf16, over long contexts: a token's logits in a verification block (chain or
    tree) are exactly those of decoding it alone. This is what makes greedy speculation repeat
    plain greedy decoding exactly, not just up to rounding."""
    nb = NativeBackend(wide_heads, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for length in (421, 527, 739, 951):
        for n in (2, 5, 9, 16):
            nb.reset()
            nb.forward(torch.randint(3, 512, (length,), generator=gen), logits_rows=None)
            block = torch.randint(3, 512, (n,), generator=gen)
            together = nb.forward(block)
            nb.truncate(length)
            alone = torch.cat([nb.forward(block[i : i + 1]) for i in range(n)])
            assert torch.equal(together, alone), (length, n)
    # A tree: spine rows first, then leaves.
    draft = Draft(tokens=[11, 12, 13, 14, 15, 16, 17], parents=[-1, 0, 1, -1, 0, 1, 2])
    nb.reset()
    nb.forward(torch.randint(3, 512, (700,), generator=gen), logits_rows=None)
    tree = nb.forward(torch.tensor([9] + draft.tokens), positions=torch.tensor([0] + draft.depths()) + 700,
                      tree_mask=draft.tree_mask())  # fmt: skip
    for node in range(len(draft)):
        path, m = [], node
        while m >= 0:
            path.append(draft.tokens[m])
            m = draft.parents[m]
        nb.truncate(700)
        for tok in [9] + path[::-1]:
            last = nb.forward(torch.tensor([tok]))
        assert torch.equal(last[0], tree[node + 1]), node


def test_linear_cuts_blocks_where_the_kernel_changes(monkeypatch):
    """A kernel whose arithmetic changes above 4 rows is detected at load time, and longer
    verification blocks are cut into chunks of 4: each row still equals the row done alone."""
    from specdecode.backends import kernels

    def drifting(self, x):  # rounding that depends on the number of rows, as real kernels may
        return torch.nn.functional.linear(x, self.weight, self.bias) + (0.5 if x.shape[0] > 4 else 0.0)

    monkeypatch.setattr(kernels.Linear, "_apply", drifting)
    w = torch.randn(8, 16).bfloat16()  # bf16 products of a few rows are row-invariant on CPU
    lin = kernels.Linear(w, None, pack=False)
    result = lin.check_rows("test.drifting")
    assert (result.invariant_rows, result.pad_rows, result.chunk_rows, lin.max_rows, result.exact) == (4, 1, 4, 4, True)
    x = torch.randn(10, 16).bfloat16()
    alone = torch.cat([lin(x[i : i + 1]) for i in range(10)])
    assert torch.equal(lin(x), alone)
    assert not torch.equal(drifting(lin, x), alone)  # uncut, the block would differ


def test_linear_pads_single_rows_where_the_kernel_takes_another_path_for_them(monkeypatch):
    """A kernel whose single-row path rounds differently from its 2+-row path (a matrix-vector
    product against a blocked product, as seen on CPUs) is not invariant even for 2 rows: single
    rows are then computed in products of 2 and blocks stay whole."""
    from specdecode.backends import kernels

    def two_paths(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias) + (0.5 if x.shape[0] == 1 else 0.0)

    monkeypatch.setattr(kernels.Linear, "_apply", two_paths)
    lin = kernels.Linear(torch.randn(8, 16).bfloat16(), None, pack=False)
    result = lin.check_rows("test.two_paths")
    assert (result.invariant_rows, result.pad_rows, result.chunk_rows, result.exact) == (1, 2, 32, True)
    x = torch.randn(33, 16).bfloat16()
    alone = torch.cat([lin(x[i : i + 1]) for i in range(33)])
    for n in (1, 2, 5, 17, 32):
        assert torch.equal(lin(x[:n]), alone[:n]), n
    assert not torch.equal(two_paths(lin, x[:1]), alone[:1])  # unpadded, a single row would differ


def test_a_lucky_probe_does_not_pass_a_kernel(monkeypatch):
    """A kernel whose rounding differs above 4 rows only for some inputs is caught by the
    several probes (one random probe of the old check could pass it)."""
    from specdecode.backends import invariance, kernels

    def sometimes(self, x):
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        # rows "near a rounding boundary": only some inputs show the kernel's change
        return y + ((x[:, :1] > 0.5) * 0.5 if x.shape[0] > 4 else 0.0)

    monkeypatch.setattr(kernels.Linear, "_apply", sometimes)
    lin = kernels.Linear(torch.randn(8, 16).bfloat16(), None, pack=False)
    probes = invariance.make_probes(16, torch.bfloat16, torch.device("cpu"))
    lucky = [p for p in probes if not (p[:5, 0] > 0.5).any()]
    assert invariance.invariant_rows(lin._apply, [torch.zeros(32, 16).bfloat16()]) == 32  # one lucky probe passes
    assert lin.check_rows("test.sometimes").chunk_rows == 4
    assert len(lucky) < len(probes)
