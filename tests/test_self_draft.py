"""The backend's self-drafting interface (SWIFT and quant draft through it)."""

from __future__ import annotations

import pytest
import torch

from specdecode.backends import HFBackend, NativeBackend, SkipSet
from specdecode.backends.quant import QuantConfig


@pytest.fixture(scope="module")
def native(stories_path):
    return NativeBackend(stories_path, dtype=torch.float32, max_length=128)


def test_drafting_forgets_its_rows_and_matches_a_plain_skipping_forward(native):
    native.reset()
    native.forward(torch.tensor([1, 400, 20, 37]), logits_rows=None)
    before = native.k_cache[:, :, :4].clone()
    skip = SkipSet(frozenset({1}), frozenset({2}))
    with native.self_draft():
        got = native.draft_forward(torch.tensor([90, 91]), skip=skip)
        assert native.length == 6
    assert native.length == 4 and torch.equal(native.k_cache[:, :, :4], before)
    want = native.forward(torch.tensor([90, 91]), skip=skip)
    native.truncate(4)
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError), native.self_draft():  # left by an error: rolled back all the same
        native.draft_forward(torch.tensor([5]))
        raise RuntimeError
    assert native.length == 4


def test_quantized_weights_and_a_twin_with_its_own_cache(native):
    assert native.supports_self_draft and native.num_layers == native.config.num_layers
    assert native.fingerprint() == {"model_type": "llama", "num_layers": native.config.num_layers,
                                    "hidden_size": native.config.hidden_size, "vocab_size": 512}  # fmt: skip
    weights = native.quantized_weights(QuantConfig.make(8))
    native.reset()
    native.forward(torch.tensor([1, 400, 20]), logits_rows=None)
    twin = native.twin(weights)
    assert twin.length == 0 and twin.embed is native.embed and twin.k_cache is not native.k_cache
    assert twin.cache_bytes == native.cache_bytes > 0
    ids = torch.tensor([1, 400, 20, 37])
    own = twin.draft_forward(ids, logits_rows=slice(-1, None))
    assert twin.length == 4 and native.length == 3  # the target's cache is not touched
    with native.self_draft():
        shared = native.draft_forward(ids[-1:], weights=weights)
    # Same quantized linears; the shared form reads the full-precision model's prefix.
    assert shared.shape == own.shape and not torch.equal(shared, own)


def test_backends_without_it_say_so(stories_path):
    hf = HFBackend(stories_path, dtype=torch.float32)
    assert not hf.supports_self_draft
    with pytest.raises(NotImplementedError, match="cannot draft for itself"):
        hf.draft_forward(torch.tensor([1]))
