"""``--method auto``: the engine picks, per request, the method that has decoded fastest here.

Which drafter pays depends on the text (lookup drafters win where the answer repeats the
prompt, a model drafter where nothing repeats) and on the machine (how much a verification
block costs), so no fixed choice suits every user. ``auto`` keeps several *arms* — exact methods
sharing the target's weights, and sharing drafters where two arms use the same one (``quant``
and ``pld+quant`` build one quantized copy) — and before each request chooses one:

* an arm never tried is tried first (in the order given);
* otherwise the arm with the best recent decode speed (tokens per second of the decoding
  steps, prompt excluded; the mean of its last ``window`` requests), except that every
  ``explore_every``-th request goes to the arm measured longest ago, so a change of workload is
  noticed.

What it learned stays for the life of the engine (in the server: across all requests). Every
arm is exact, so the output is plain decoding's whatever is chosen. Seeded sampling repeats its
output only with the same drafts, so a seeded request always runs the first arm.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator

from .drafters import registry
from .drafters.base import Drafter
from .engine import CHOOSERS, Engine
from .errors import InvalidArgument
from .checks import integer
from .results import GenerationResult

DEFAULT_ARMS = ("pld+quant", "pld", "quant")  # no second model needed (quant: native backend)
DEFAULT_ARMS_WITH_DRAFT_MODEL = ("pld+sps", "sps", "pld")


class ArmChooser:
    """A bandit over arms, rewarded by measured decode speed (see the module's docstring)."""

    def __init__(self, arms: list[str], *, window: int = 6, explore_every: int = 8):
        if not arms:
            raise InvalidArgument("arms", "expected at least one method")
        for name, value in (("window", window), ("explore_every", explore_every)):
            integer(name, value)
        self.arms = list(arms)
        self.explore_every = explore_every
        self.speeds: dict[str, deque[float]] = {a: deque(maxlen=window) for a in self.arms}
        self.last_used: dict[str, int] = {a: -1 for a in self.arms}
        self.requests = 0

    def mean(self, arm: str) -> float | None:
        s = self.speeds[arm]
        return sum(s) / len(s) if s else None

    def choose(self) -> str:
        self.requests += 1
        untried = [a for a in self.arms if not self.speeds[a]]
        if untried:
            return untried[0]
        best = max(self.arms, key=lambda a: self.mean(a))
        if len(self.arms) > 1 and self.requests % self.explore_every == 0:
            return min((a for a in self.arms if a != best), key=lambda a: self.last_used[a])
        return best

    def record(self, arm: str, tokens: int, seconds: float) -> None:
        self.last_used[arm] = self.requests
        if tokens > 1 and seconds > 0:  # a one-token answer says nothing about drafting
            self.speeds[arm].append(tokens / seconds)

    def stats(self) -> dict:
        return {f"auto.tokens_per_s.{a}": round(m, 2) for a in self.arms if (m := self.mean(a)) is not None}


class _Arms(Drafter):
    """What ``engine.drafter`` is for ``auto``: forgetting and statistics reach every arm."""

    name = "auto"
    default_draft_length = 0

    def __init__(self, arms: dict[str, Engine]):
        self.arm_engines = arms

    def _parts(self) -> list[Drafter]:
        """Every arm's drafters, each once (arms share them)."""
        parts: dict[int, Drafter] = {}
        for engine in self.arm_engines.values():
            for d in _drafters(engine.drafter):
                parts.setdefault(id(d), d)
        return list(parts.values())

    def forget(self) -> None:
        for d in self._parts():
            d.forget()

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self._parts())


def _drafters(drafter: Drafter) -> list[Drafter]:
    parts = [getattr(drafter, "first", None), getattr(drafter, "second", None)]
    return [p for p in parts if p is not None] or [drafter]


def parse_arms(value, has_draft_model: bool) -> list[str]:
    if value is None:
        return list(DEFAULT_ARMS_WITH_DRAFT_MODEL if has_draft_model else DEFAULT_ARMS)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidArgument("arms", f"expected methods separated by commas (e.g. pld,pld+quant), got {value!r}")
    if "auto" in value or "vanilla" in value:
        raise InvalidArgument("arms", "auto chooses among drafting methods; 'auto' and 'vanilla' cannot be arms")
    if len(set(value)) < len(value):
        raise InvalidArgument("arms", f"an arm is listed twice: {value!r}")
    return list(value)


class AutoEngine(Engine):
    """An engine whose requests each run on one of its arms (engines sharing its target)."""

    def __init__(self, base: Engine, arm_engines: dict[str, Engine], chooser: ArmChooser):
        first = arm_engines[chooser.arms[0]]
        super().__init__(base.target, base.tokenizer, _Arms(arm_engines), model_name=base.model_name,
                         eos_ids=base.eos_ids, verify=first.verify)  # fmt: skip
        self.method = "auto"
        self.chooser, self.arm_engines = chooser, arm_engines
        self.model_path, self.backend_name = base.model_path, base.backend_name

    def _generation(self, prompt_ids, max_new_tokens, params, stop) -> Generator[str, None, GenerationResult]:
        seeded = params.seed is not None and not params.greedy
        name = self.chooser.arms[0] if seeded else self.chooser.choose()
        arm = self.arm_engines[name]
        arm.eos_ids = self.eos_ids  # a caller may have changed them on this engine
        result = yield from arm._generation(prompt_ids, max_new_tokens, params, stop)
        s = result.stats
        if not seeded:
            self.chooser.record(name, s.new_tokens, s.total_time - s.prefill_time)
        s.method = {"auto.arm": name, **self.chooser.stats(), **s.method}
        return result


def build_auto(base: Engine, *, draft_model, sizing, progress, draft_quant, verify, arms=None, window: int = 6,
               explore_every: int = 8, **others) -> "AutoEngine":
    """``Engine.with_method("auto", ...)``: an engine that runs each request on the arm that has
    decoded fastest, its arms engines sharing ``base``'s target."""
    if others:
        raise InvalidArgument("method_options", f"auto takes arms, window and explore_every, not {', '.join(others)}")
    explicit = arms is not None
    names = parse_arms(arms, draft_model is not None)
    if not explicit and not base.target.supports_self_draft:  # default arms with quant need the native backend
        names = [n for n in names if not registry.needs(n, "self_drafting")] or ["pld"]
    for name in names:
        if registry.needs(name, "draft_model") and draft_model is None:
            raise InvalidArgument("draft_model", f"auto's arm {name!r} needs a draft model")
    if draft_model is not None and not any(registry.needs(n, "draft_model") for n in names):
        raise InvalidArgument("draft_model", f"none of auto's arms ({', '.join(names)}) uses a draft model")
    chooser = ArmChooser(names, window=window, explore_every=explore_every)
    shared: dict[str, Drafter] = {}

    def arm(name: str) -> Engine:
        uses = registry.needs(name, "draft_model")
        return base.with_method(
            name, draft_model=draft_model if uses else None, sizing=sizing, progress=progress,
            draft_quant=draft_quant if uses else None, verify=verify, _shared=shared,
        )  # fmt: skip

    return AutoEngine(base, {name: arm(name) for name in names}, chooser)


CHOOSERS["auto"] = build_auto
