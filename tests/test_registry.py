"""The drafter registry: what each method declares, and the answers built on it."""

from __future__ import annotations

import pytest

from specdecode.drafters import METHODS, registry
from specdecode.errors import InvalidArgument


def test_methods_and_their_needs():
    assert list(METHODS) == list(registry.REGISTRY)
    assert all(METHODS[n] is m.drafter and m.name == n for n, m in registry.REGISTRY.items())
    assert registry.names(draft_model=True) == ["sps"]
    assert registry.names(self_drafting=True) == ["swift", "quant"]
    assert registry.names(batchable=False) == ["swift"]  # its skip set is tuned on one sequence
    assert registry.names(batchable=True) == ["vanilla", "sps", "pld", "quant", "suffix", "recycle", "suffix+recycle",
                                              "lookahead", "rest", "eagle", "medusa", "specdec-drafter"]  # fmt: skip
    assert registry.names(trained_head=True) == ["eagle", "medusa", "specdec-drafter"]
    assert registry.names(datastore=True) == ["rest"]
    assert set(registry.names(reads_text=True)) == {"suffix", "suffix+recycle", "rest"}
    assert registry.names(lossless=False) == []


def test_hybrids_need_what_their_parts_need():
    assert registry.needs("pld+sps", "draft_model") and not registry.needs("pld+quant", "draft_model")
    assert registry.needs("pld+quant", "self_drafting") and not registry.needs("pld+suffix", "self_drafting")
    assert registry.batchable("pld+suffix") and registry.batchable("suffix+recycle")
    assert registry.batchable("pld+sps") and registry.batchable("rest") and not registry.batchable("pld+swift")
    assert registry.method_components("pld+quant") == ["pld", "quant"]
    assert registry.method_components("suffix+recycle") == ["suffix+recycle"]  # a method of its own
    assert registry.method_components("auto") == []


@pytest.mark.parametrize(
    "method, message",
    [
        ("bogus", "or two of them joined by '+'"),
        ("pld+pld", "two different drafting methods"),
        ("pld+vanilla", "two different drafting methods"),
        ("pld+suffix+rest", "two different drafting methods"),
        (3, "expected a method name"),
    ],
)
def test_unknown_methods_are_clear_errors(method, message):
    with pytest.raises(InvalidArgument) as e:
        registry.components(method)
    assert e.value.argument == "method" and message in str(e.value)


def test_draft_model_checks():
    registry.check_draft_model("pld+sps", "some/model")
    registry.check_draft_model("pld", None)
    with pytest.raises(InvalidArgument, match="method 'sps' needs a draft model"):
        registry.check_draft_model("sps", None)
    with pytest.raises(InvalidArgument, match="only method 'sps' uses a draft model, not 'pld'"):
        registry.check_draft_model("pld", "some/model")
    with pytest.raises(InvalidArgument, match="only method 'sps' has a draft model to quantize"):
        registry.check_draft_quant("quant", "int4")
    registry.check_draft_quant("pld+sps", "int4")
