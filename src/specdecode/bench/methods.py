"""Which methods a benchmark runs, with their options, and how each of ours runs one turn.

Our methods are whatever ``specdecode.drafters.registry`` registers (looked up, never listed
here, and so are their needs). The peers run transformers' own ``generate`` (see ``peers.py``). Every method answers a
turn through the same call, ``run_turn(prompt_ids, ...) -> TurnOutput``, so the worker can time
them all alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument

# Peer name -> the generation options it accepts (passed to transformers' GenerationConfig).
PEERS: dict[str, tuple[str, ...]] = {
    "hf-vanilla": (),
    "hf-pld": ("prompt_lookup_num_tokens", "max_matching_ngram_size"),
    "hf-assisted": ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold"),
}
# prompt_lookup_num_tokens has no default in transformers; 10 is the value its docs use.
PEER_DEFAULTS: dict[str, dict[str, Any]] = {"hf-pld": {"prompt_lookup_num_tokens": 10}}


def our_methods() -> dict[str, type]:
    from ..drafters import METHODS

    return METHODS


def _uses_draft_model(name: str) -> bool:
    from ..drafters import registry

    try:
        return registry.needs(name, "draft_model")
    except InvalidArgument:  # not a method: reported where it is built
        return False


def known_methods() -> list[str]:
    return [*our_methods(), *PEERS]


def is_known(name: str) -> bool:
    """A registered method, a hybrid ``A+B`` of two, ``auto``, or a peer."""
    from ..drafters.registry import method_components

    if name in PEERS:
        return True
    try:
        method_components(name)
    except InvalidArgument:
        return False
    return True


def base_method(name: str) -> str:
    """``pld@b3`` -> ``pld``: a variant (the same method with other options) runs as its base."""
    return name.partition("@")[0]


@dataclass(frozen=True)
class MethodSpec:
    name: str  # a method, or a variant of one: ``method@label``
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return base_method(self.name)

    @property
    def is_peer(self) -> bool:
        return self.base in PEERS

    @property
    def needs_draft_model(self) -> bool:
        if self.is_peer:
            return self.base == "hf-assisted"
        if self.base == "auto":  # when one of its arms does
            arms = self.options.get("arms", "")
            names = arms.split(",") if isinstance(arms, str) else arms if isinstance(arms, (list, tuple)) else []
            return any(isinstance(n, str) and _uses_draft_model(n.strip()) for n in names)
        return _uses_draft_model(self.base)

    @property
    def lossy(self) -> str | None:
        """The lossy acceptance rule this method runs with (as options), or None when exact."""
        if self.options.get("verify") == "specdec" and self.options.get("beta", 3) != 1:
            return "specdec " + ", ".join(f"{k}={self.options[k]}" for k in ("beta", "tau") if k in self.options)
        return None


def _parse_value(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


GROUPS = {"ours": lambda: list(our_methods()), "peers": lambda: list(PEERS), "all": known_methods}


def parse_methods(text: str, option_items: list[str] | None = None) -> list[MethodSpec]:
    """``"vanilla,pld,hf-vanilla"`` and ``["pld.max_ngram=4"]`` -> method specs, in order.

    ``ours`` stands for all our registered methods, ``peers`` for the hf-* ones, ``all`` for both.
    ``method@label`` is a variant of a method, to run it beside itself with other options, e.g.
    ``pld,pld@b3`` with ``-O pld@b3.verify=specdec -O pld@b3.beta=3``.
    """
    names = []
    for n in (text or "").split(","):
        n = n.strip()
        names.extend(GROUPS[n]() if n in GROUPS else [n] if n else [])
    if not names:
        raise InvalidArgument("methods", "expected at least one method")
    known = known_methods()
    for name in names:
        if not is_known(base_method(name)):
            raise InvalidArgument("methods", f"unknown method {name!r}; expected some of {', '.join(known)}, auto, "
                                  "or two of ours joined by '+' (e.g. pld+quant)")  # fmt: skip
        if "@" in name and not name.partition("@")[2].replace("-", "").replace("_", "").isalnum():
            raise InvalidArgument("methods", f"{name!r}: a variant's label (after @) takes letters, digits, - and _")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidArgument("methods", f"method {duplicates[0]!r} is listed twice")
    options: dict[str, dict[str, Any]] = {n: dict(PEER_DEFAULTS.get(base_method(n), {})) for n in names}
    for item in option_items or []:
        target, sep, value = item.partition("=")
        method, dot, key = target.rpartition(".")
        if not sep or not dot or not method.strip() or not key.strip():
            raise InvalidArgument("method_option", f"expected method.key=value, got {item!r}")
        method, key = method.strip(), key.strip().replace("-", "_")
        if method not in options:
            raise InvalidArgument("method_option", f"{item!r} is for {method!r}, which is not among --methods")
        peer = base_method(method)
        if peer in PEERS and key not in PEERS[peer]:
            allowed = ", ".join(PEERS[peer]) or "none"
            raise InvalidArgument("method_option", f"{method} takes no option {key!r} (options: {allowed})")
        options[method][key] = _parse_value(value)
    return [MethodSpec(n, options[n]) for n in names]


def default_baseline(methods: list[str]) -> str:
    """hf-vanilla when it runs, else our vanilla, else the first method."""
    for name in ("hf-vanilla", "vanilla"):
        if name in methods:
            return name
    return methods[0]


@dataclass
class TurnOutput:
    """What one method produced for one turn, before timing is added."""

    token_ids: list[int]
    decoding_steps: int
    accept_lengths: list[int]  # tokens emitted per decoding step
    drafted_tokens: int | None = None  # None: the method does not report it
    accepted_draft_tokens: int | None = None
    first_token_seconds: float | None = None  # until the first step's tokens (prompt included)
    verified_draft_tokens: int | None = None  # of the drafted tokens, those sent to verification
    drafter_bytes: int | None = None  # memory the drafter adds to the target's (weights, caches)


class OurMethod:
    """One of our methods, on an engine that shares the target with the other methods."""

    def __init__(self, engine):
        self.engine = engine

    def run_turn(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int | None) -> TurnOutput:
        result = self.engine.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        s = result.stats
        return TurnOutput(
            list(result.token_ids), s.target_forwards, list(s.accept_lengths), s.drafted_tokens, s.accepted_draft_tokens,
            s.first_token_time, s.verified_draft_tokens, self.engine.drafter.nbytes,
        )
