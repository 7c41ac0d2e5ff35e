"""Every drafting method by name, with what it needs, in one place; and the factory that
builds a method's drafter.

A method string is parsed once (``parse``) into a ``MethodSpec``: its registered parts, their
options and the acceptance rule. ``build`` then makes the drafter from a ``BuildContext`` (the
target, its tokenizer, a way to load a draft model). The engine, the batch scheduler, the
benchmark and the server ask this registry instead of testing method names: whether a method
needs a draft model, drafts through the target itself, drafts trees, can run beside other
requests in a batch. A new method is its drafter's module and one row here (see
``drafters/base.py`` for the interface its drafter implements).

A method name is a registered name, or a hybrid ``A+B`` of two (``drafters/hybrid.py``): B
drafts where A has nothing. ``auto`` (``auto.py``) is not a method of its own but a choice
among others, per request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument
from ..verification import VerifyRule
from .base import Drafter, VanillaDrafter
from .eagle import EagleDrafter, MedusaDrafter, SpecDecDrafter
from .lookahead import LookaheadDrafter
from .pld import PromptLookupDrafter
from .quant import QuantDrafter
from .recycle import RecycleDrafter, SuffixRecycleDrafter
from .rest import RestDrafter
from .sps import DraftModelDrafter
from .suffix import SuffixDrafter
from .swift import SwiftDrafter


@dataclass(frozen=True)
class Method:
    """A drafting method and what it needs."""

    name: str
    drafter: type[Drafter]
    # Drafts with a second, smaller model sharing the target's tokenizer: it needs
    # ``draft_model`` (and only such a method takes one, or ``draft_quant``).
    draft_model: bool = False
    # Drafts with the target itself, through the backend's self-drafting interface (sub-layers
    # skipped, quantized linears; ``Backend.self_draft``): the native backend only.
    self_drafting: bool = False
    # Proposes token trees, verified in one forward with a tree mask where the backend can, and
    # its best path where it cannot: the factory passes ``tree=`` from the backend. (swift,
    # quant and lookahead grow trees too, but need the native backend, which verifies them.)
    trees: bool = False
    # Drafts from a retrieval datastore built ahead (``specdecode datastore build``).
    datastore: bool = False
    # Reads text with the target's tokenizer (a corpus, a datastore): built with ``tokenizer=``.
    reads_text: bool = False
    # Drafts with a trained head over the target's hidden states (``specdecode train-drafter``):
    # built with the model's name, to find the head cached for it.
    trained_head: bool = False
    # The batch scheduler can run a copy of its drafter per request (``Drafter.fork``): the
    # factory marks the drafters it builds. Not swift, whose skip set is tuned on one sequence.
    batchable: bool = True
    # Its output is the target's own. Every drafting method is lossless; only a lossy
    # acceptance rule (verification.py, chosen apart from the method) is not. A method that is
    # not would make every result say so (``Engine.lossy``).
    lossless: bool = True

    def build(self, context: "BuildContext", options: dict[str, Any]) -> Drafter:
        """This method's drafter for ``context``'s target, with ``options`` (its own)."""
        options = dict(options)
        if self.trees:
            options.setdefault("tree", context.target.supports_tree)
        if self.reads_text:
            options.setdefault("tokenizer", context.tokenizer)  # e.g. to read a corpus
        if self.trained_head:
            options.setdefault("model_name", context.model_name)
        make = self.drafter.create
        if self.draft_model:  # a draft model's drafter is built on that model, not the target
            model = context.draft_model()
            make = lambda _target, **o: self.drafter(model, **o)  # noqa: E731
        try:
            drafter = make(context.target, **options)
        except TypeError as e:  # an option the method does not take
            raise InvalidArgument("method_options", f"method {self.name!r}: {e}") from None
        drafter.batchable, drafter.lossless = self.batchable, self.lossless
        return drafter


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("vanilla", VanillaDrafter),
        Method("sps", DraftModelDrafter, draft_model=True),
        Method("pld", PromptLookupDrafter),
        Method("swift", SwiftDrafter, self_drafting=True, batchable=False),
        Method("quant", QuantDrafter, self_drafting=True),
        # Model-free drafters (no weights of their own): suffix structures, the target's own
        # verification logits, Jacobi iteration, retrieval.
        Method("suffix", SuffixDrafter, trees=True, reads_text=True),  # reads a corpus file
        Method("recycle", RecycleDrafter, trees=True),
        Method("suffix+recycle", SuffixRecycleDrafter, trees=True, reads_text=True),
        Method("lookahead", LookaheadDrafter),  # needs the native backend's tree verification
        # The tokenizer checks that the datastore speaks the target's tokens.
        Method("rest", RestDrafter, trees=True, datastore=True, reads_text=True),
        # Trained heads over the target's hidden states (heads/; specdecode train-drafter).
        Method("eagle", EagleDrafter, trees=True, trained_head=True),
        Method("medusa", MedusaDrafter, trees=True, trained_head=True),
        Method("specdec-drafter", SpecDecDrafter, trees=True, trained_head=True),
    )
}


def names(**needs: bool) -> list[str]:
    """The registered methods whose declarations match ``needs``, in registration order:
    ``names(self_drafting=True)`` -> ["swift", "quant"]."""
    return [m.name for m in REGISTRY.values() if all(getattr(m, k) == v for k, v in needs.items())]


def components(method: str) -> list[Method]:
    """The methods ``method`` is made of: itself, or the two of a hybrid ``A+B``. Raises
    InvalidArgument (argument ``method``) for anything else."""
    if not isinstance(method, str):
        raise InvalidArgument("method", f"expected a method name, got {method!r}")
    parts = [method] if method in REGISTRY or "+" not in method else method.split("+")
    for part in parts:
        if part not in REGISTRY:
            raise InvalidArgument(
                "method", f"expected one of {', '.join(REGISTRY)} or two of them joined by '+', got {method!r}"
            )
    if len(parts) > 2 or "vanilla" in parts and len(parts) > 1 or len(set(parts)) < len(parts):
        raise InvalidArgument("method", f"a hybrid joins two different drafting methods (e.g. pld+sps), got {method!r}")
    return [REGISTRY[p] for p in parts]


def method_components(method: str) -> list[str]:
    """The names of the registered methods ``method`` is made of: itself, the two of a hybrid
    ``A+B``, or none for ``auto`` (which chooses among others). Raises InvalidArgument for an
    unknown name."""
    return [] if method == "auto" else [m.name for m in components(method)]


def needs(method: str, need: str) -> bool:
    """Whether ``method`` (or a part of a hybrid) declares ``need``, e.g. ``needs("pld+sps",
    "draft_model")``."""
    return any(getattr(m, need) for m in components(method))


def batchable(method: str) -> bool:
    """Whether the batch scheduler can run ``method`` (a hybrid: both its parts)."""
    return all(m.batchable for m in components(method))


def _quoted(names_: list[str]) -> str:
    return " or ".join(repr(n) for n in names_)


def check_draft_model(method: str, draft_model) -> None:
    """A draft model is given exactly when ``method`` drafts with one."""
    uses = needs(method, "draft_model")
    if uses and draft_model is None:
        raise InvalidArgument("draft_model", f"method {method!r} needs a draft model (same tokenizer as the target)")
    if not uses and draft_model is not None:
        raise InvalidArgument("draft_model", f"only method {_quoted(names(draft_model=True))} uses a draft model, not {method!r}")


def check_draft_quant(method: str, draft_quant) -> None:
    """Only a method with a draft model has one to quantize."""
    if draft_quant is not None and not needs(method, "draft_model"):
        raise InvalidArgument(
            "draft_quant", f"only method {_quoted(names(draft_model=True))} has a draft model to quantize, not {method!r}"
        )


# ---- parsing once, building from a context -------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A method string, parsed and checked: its parts, their options, the acceptance rule."""

    name: str
    parts: tuple[Method, ...]
    options: dict[str, Any] = field(default_factory=dict)  # a single method's; a hybrid takes none
    rule: VerifyRule = field(default_factory=VerifyRule)


def parse(method: str, options: dict[str, Any] | None = None, verify: str | None = "exact") -> MethodSpec:
    """``method`` (a name or a hybrid ``A+B``), its options and the acceptance rule, checked
    once (InvalidArgument naming the argument at fault)."""
    options = dict(options or {})
    parts = tuple(components(method))
    # A hybrid takes no options of its parts', but the head of a part that drafts with one.
    hybrid_ok = {"beta", "tau"} | ({"drafter"} if any(p.trained_head for p in parts) else set())
    if len(parts) > 1 and options and set(options) - hybrid_ok:
        raise InvalidArgument("method_options", f"hybrid {method!r}: options go to its methods one at a time; none are taken here")
    rule = VerifyRule.parse(verify, options)  # takes beta and tau out of the options
    return MethodSpec(method, parts, options, rule)


@dataclass(frozen=True)
class BuildContext:
    """What the factory builds drafters from: the target, its tokenizer, and a loader of the
    draft model (called only for a method that drafts with one)."""

    target: Any  # backends.Backend
    tokenizer: Any = None
    draft_model: Callable[[], Any] | None = None
    model_name: str = ""  # the target's short name (where its trained heads are cached)


def build(spec: MethodSpec, context: BuildContext, built: dict[str, Drafter] | None = None) -> Drafter:
    """The drafter for ``spec``: its method's, or a hybrid of its two parts' (``built``: drafters
    already made by name, reused: auto's arms share one quantized copy)."""
    from .hybrid import HybridDrafter

    built = {} if built is None else built
    drafters = []
    for method in spec.parts:
        if method.name not in built:
            options = spec.options if len(spec.parts) == 1 or method.trained_head else {}
            built[method.name] = method.build(context, options)
        drafters.append(built[method.name])
    return drafters[0] if len(drafters) == 1 else HybridDrafter(*drafters)

