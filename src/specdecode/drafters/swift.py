"""SWIFT: self-speculative decoding that drafts with the target itself, some sub-layers skipped.

(Xia et al., "SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference Acceleration",
ICLR 2025.) No second model and no training:

* Drafting: the target runs with a set of attention and MLP sub-layers skipped (the first and
  last layer never), through the backend's self-drafting interface (``Backend.self_draft``):
  it reuses the target's KV cache for the layers it runs; after drafting the cache is rolled
  back, and verification rewrites every layer, so the cache then holds exactly
  the accepted tokens. No extra weights in memory.
* Confidence-aware drafting: drafting stops when the draft's top-1 probability falls below a
  threshold or at a maximum depth; at each depth, the less confident the draft, the more of its
  next-best tokens are added as sibling leaves, forming a token tree verified in one forward.
* On-the-fly layer-set optimisation: while serving, after verification steps, a candidate skip
  set (random search; every ``bayes_interval`` steps a Bayesian-optimisation suggestion — a
  Gaussian process with an upper-confidence-bound acquisition) is scored by one parallel forward
  of the skipping model over a window of text already decoded: the fraction of positions where
  its argmax equals the actual next token. A candidate is kept only when it beats the best.
  The search stops at a target score, after a patience without improvement, or at a cap; then
  the acceleration phase runs with the best set. The state lives as long as the engine and can
  be saved to / loaded from a JSON file (per model, optionally per task).
* Fallback (ours, not the paper's): drafting steps and plain steps are timed, and while drafting
  measures slower than plain decoding the drafter proposes nothing (see ``payoff.py``). A small
  model on a memory-bound CPU can have no skip set that pays; SWIFT then costs little more than
  plain decoding instead of slowing it down.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backends import Backend, SkipSet
from ..draft import Draft
from .. import checks as opt
from ..errors import InvalidArgument
from .base import Drafter
from .payoff import DraftingPayoff


def _fraction(name: str, value, *, open_interval: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and ((0 < value < 1) if open_interval else (0 <= value <= 1))
    if not ok:
        interval = "(0, 1)" if open_interval else "[0, 1]"
        raise InvalidArgument(name, f"expected a number in {interval}, got {value!r}")
    return float(value)


def _positive(name: str, value) -> int:
    return opt.integer(name, value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(name, f"expected true or false, got {value!r}")
    return value


@dataclass
class SwiftState:
    """The layer-set search: persists across requests, saved as JSON."""

    attention: list[int]
    mlp: list[int]
    score: float | None = None  # match score of the current set on the last scoring window
    steps: int = 0  # candidates scored
    since_improvement: int = 0
    done: bool = False
    seconds: float = 0.0  # time spent optimising
    history: list[tuple[list[float], float]] = field(default_factory=list)  # (x, score) for the GP

    @property
    def skip(self) -> SkipSet:
        return SkipSet(frozenset(self.attention), frozenset(self.mlp))


class SwiftDrafter(Drafter):
    name = "swift"
    default_draft_length = 24  # most tree nodes per step (one verification forward)

    def __init__(
        self,
        target: Backend,
        *,
        skip_ratio: float = 0.45,
        confidence_threshold: float = 0.8,
        max_depth: int = 25,
        branches: tuple[int, ...] | list[int] = (1, 2, 3, 4),
        optimize: bool = True,
        context_window: int = 32,
        opt_interval: int = 1,
        bayes_interval: int = 25,
        max_opt_steps: int = 1000,
        patience: int = 300,
        target_score: float = 0.95,
        skip_set_file: str | Path | None = None,
        task: str | None = None,
        seed: int = 0,
        fallback: bool = True,
    ):
        if not target.supports_self_draft:
            raise InvalidArgument("method", f"swift skips sub-layers, which the {target.name!r} backend cannot; use backend='native'")
        self.target = target
        self.skip_ratio = _fraction("skip_ratio", skip_ratio, open_interval=True)
        self.confidence_threshold = _fraction("confidence_threshold", confidence_threshold, open_interval=False)
        self.target_score = _fraction("target_score", target_score, open_interval=False)
        self.max_depth = _positive("max_depth", max_depth)
        self.context_window = _positive("context_window", context_window)
        self.opt_interval = _positive("opt_interval", opt_interval)
        self.bayes_interval = _positive("bayes_interval", bayes_interval)
        self.max_opt_steps = _positive("max_opt_steps", max_opt_steps)
        self.patience = _positive("patience", patience)
        branches = tuple(branches)
        if len(branches) != 4 or not all(isinstance(b, int) and b >= 1 for b in branches):
            raise InvalidArgument(
                "branches", f"expected 4 positive integers (candidates at top-1 probability >0.95, >0.8, >0.5, else), got {branches!r}"
            )
        self.branches = branches
        self.task = task
        self.layers = target.num_layers
        # Sub-layers that may be skipped: attention then MLP of layers 1 .. L-2.
        self.inner = list(range(1, self.layers - 1))
        self.num_skip = max(1, int(round(2 * len(self.inner) * self.skip_ratio))) if self.inner else 0
        self.rng = np.random.default_rng(seed)
        self.state = SwiftState(*self._initial_set())
        self._prompt_len = 0
        self._step = 0
        self._window_scored = False
        self._opt_seconds_at_begin = 0.0
        self._opt_steps_at_begin = 0
        self.payoff = DraftingPayoff() if _flag("fallback", fallback) else None
        self._plain_steps_at_begin = 0
        self._step_started: float | None = None  # when propose was called (drafting, then verification)
        self.file = Path(skip_set_file) if skip_set_file else None
        if self.file is not None and self.file.exists():
            self.load(self.file)
        # optimize=False means the acceleration phase only, whatever a loaded file says.
        self.state.done = self.state.done or not _flag("optimize", optimize) or not self.inner

    @classmethod
    def create(cls, target, **options) -> "SwiftDrafter":
        return cls(target, **options)

    # ---- skip sets --------------------------------------------------------------------------
    def _initial_set(self) -> tuple[list[int], list[int]]:
        """Evenly spread: every other inner layer, attention and MLP alike, cut to size."""
        order = self.inner[::2] + self.inner[1::2]
        picks = [("a", i) for i in order[: (self.num_skip + 1) // 2]] + [("m", i) for i in order[: self.num_skip // 2]]
        return sorted(i for k, i in picks if k == "a"), sorted(i for k, i in picks if k == "m")

    def _to_vector(self, attention, mlp) -> list[float]:
        a, m = set(attention), set(mlp)
        return [float(i in a) for i in self.inner] + [float(i in m) for i in self.inner]

    def _from_scores(self, x: np.ndarray) -> tuple[list[int], list[int]]:
        """The ``num_skip`` sub-layers with the highest coordinates of ``x``."""
        top = np.argsort(-np.asarray(x), kind="stable")[: self.num_skip]
        n = len(self.inner)
        return sorted(self.inner[j] for j in top if j < n), sorted(self.inner[j - n] for j in top if j >= n)

    def _random_candidate(self) -> tuple[list[int], list[int]]:
        return self._from_scores(self.rng.random(2 * len(self.inner)))

    def _bayes_candidate(self, pool: int = 2048) -> tuple[list[int], list[int]]:
        """Gaussian-process upper-confidence-bound suggestion.

        A GP (scikit-learn) is fitted to the sets scored so far (0/1 vectors over the
        sub-layers -> match score); among ``pool`` random sets of the right size, the one with
        the highest mean + kappa * std is suggested. Sampling the feasible sets directly avoids
        rounding a continuous optimum to a set of exactly ``num_skip`` sub-layers.
        """
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern

        latest = {tuple(x): score for x, score in self.state.history}  # one point per distinct set
        x = np.array(list(latest), dtype=float)
        y = np.array(list(latest.values()), dtype=float)
        gp = GaussianProcessRegressor(
            kernel=ConstantKernel(1.0) * Matern(length_scale=2.0, nu=2.5), alpha=1e-2, normalize_y=True,
            random_state=int(self.rng.integers(1 << 31)),
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence notes on small histories
            gp.fit(x, y)
        dims = 2 * len(self.inner)
        scores = self.rng.random((pool, dims))
        top = np.argsort(-scores, axis=1)[:, : self.num_skip]
        candidates = np.zeros((pool, dims))
        np.put_along_axis(candidates, top, 1.0, axis=1)
        mean, std = gp.predict(candidates, return_std=True)
        best = candidates[int(np.argmax(mean + 2.5 * std))]
        return self._from_scores(best)

    # ---- drafting ---------------------------------------------------------------------------
    def _candidates(self, confidence: float) -> int:
        for bound, k in zip((0.95, 0.8, 0.5), self.branches):
            if confidence > bound:
                return k
        return self.branches[3]

    def begin(self, prompt_ids):
        self._prompt_len = len(prompt_ids)
        self._window_scored = False
        self._step = 0
        self._opt_seconds_at_begin = self.state.seconds
        self._opt_steps_at_begin = self.state.steps
        self._plain_steps_at_begin = self.payoff.plain_steps if self.payoff else 0
        self._step_started = None

    def propose(self, tokens, max_tokens, params, generator) -> Draft:
        self._step_started = time.perf_counter()
        if self.payoff is not None and not self.payoff.should_draft():
            return Draft()  # a plain step: the target alone, one token
        return self._draft(tokens, max_tokens)

    @torch.inference_mode()
    def _draft(self, tokens, max_tokens) -> Draft:
        target, skip = self.target, self.state.skip
        draft = Draft()
        parent, tok = -1, tokens[-1]
        kmax = max(self.branches)
        with target.self_draft():
            for _ in range(min(self.max_depth, max_tokens, target.max_length - target.length - 1)):
                logits = target.draft_forward(torch.tensor([tok]), skip=skip)[0]
                top = torch.topk(logits.softmax(-1), min(kmax, logits.shape[-1]))
                values, ids = top.values.tolist(), top.indices.tolist()
                width = min(self._candidates(values[0]), max_tokens - len(draft))
                spine = len(draft)
                for t in ids[:width]:
                    draft.tokens.append(t)
                    draft.parents.append(parent)
                if values[0] < self.confidence_threshold or len(draft) >= max_tokens:
                    break
                parent, tok = spine, ids[0]
        return draft

    # ---- learning from the verdict: the optimisation phase ------------------------------------
    def update(self, tokens, num_accepted, draft) -> None:
        if self.payoff is not None and self._step_started is not None:
            self.payoff.record(len(draft) > 0, num_accepted + 1, time.perf_counter() - self._step_started)
            self._step_started = None
        self._step += 1
        state = self.state
        window = self.context_window + 1
        if state.done or len(tokens) - self._prompt_len < window + 1 or self._step % self.opt_interval:
            return
        t0 = time.perf_counter()
        block = tokens[self._prompt_len : self._prompt_len + window]
        if not self._window_scored:
            # Scores are comparable only on the same text: re-score the best set on this
            # request's window before judging candidates against it.
            state.score = self.score(block, state.skip)
            self._window_scored = True
        if (state.steps + 1) % self.bayes_interval == 0 and len(state.history) >= 2:
            attention, mlp = self._bayes_candidate()
        else:
            attention, mlp = self._random_candidate()
        score = self.score(block, SkipSet(frozenset(attention), frozenset(mlp)))
        state.history.append((self._to_vector(attention, mlp), score))
        state.steps += 1
        if state.score is None or score > state.score:
            state.attention, state.mlp, state.score = attention, mlp, score
            state.since_improvement = 0
            if self.payoff is not None:
                self.payoff.forget_drafting()
        else:
            state.since_improvement += 1
        if state.score >= self.target_score or state.since_improvement >= self.patience or state.steps >= self.max_opt_steps:
            state.done = True
        state.seconds += time.perf_counter() - t0
        if state.done and self.file is not None:
            self.save(self.file)

    @torch.inference_mode()
    def score(self, block: list[int], skip: SkipSet) -> float:
        """Fraction of positions of ``block`` (text already decoded, right after the prompt)
        where the skipping model's argmax is the actual next token. One parallel forward after
        the cache, seeing only the prompt's cache entries; the cache is left as it was."""
        target = self.target
        positions = torch.arange(len(block)) + self._prompt_len
        with target.self_draft():
            logits = target.draft_forward(torch.tensor(block), positions=positions, skip=skip, context=self._prompt_len)
        hits = logits[:-1].argmax(-1) == torch.tensor(block[1:], device=logits.device)
        return float(hits.float().mean())

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        data = {
            "format": "specdecode-swift-1",
            "model": self.target.fingerprint(),
            "task": self.task,
            "skip_ratio": self.skip_ratio,
            **{k: v for k, v in asdict(self.state).items() if k != "history"},
        }
        Path(path).write_text(json.dumps(data, indent=1))

    def load(self, path: str | Path) -> None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidArgument("skip_set_file", f"cannot read {str(path)!r}: {e}") from None
        if not isinstance(data, dict) or data.get("format") != "specdecode-swift-1":
            raise InvalidArgument("skip_set_file", f"{str(path)!r} is not a specdecode SWIFT skip-set file")
        if data.get("model") != self.target.fingerprint():
            raise InvalidArgument(
                "skip_set_file", f"{str(path)!r} was tuned for another model ({data.get('model')}), not {self.target.fingerprint()}"
            )
        if self.task is not None and data.get("task") not in (None, self.task):
            raise InvalidArgument("skip_set_file", f"{str(path)!r} was tuned for task {data.get('task')!r}, not {self.task!r}")
        inner = set(self.inner)
        attention, mlp = data.get("attention"), data.get("mlp")
        if not all(isinstance(s, list) and set(s) <= inner for s in (attention, mlp)):
            raise InvalidArgument("skip_set_file", f"{str(path)!r} names layers outside 1..{self.layers - 2}")
        self.state = SwiftState(
            attention=sorted(attention), mlp=sorted(mlp), score=data.get("score"), steps=int(data.get("steps", 0)),
            since_improvement=int(data.get("since_improvement", 0)), done=bool(data.get("done", True)),
            seconds=float(data.get("seconds", 0.0)),
        )  # fmt: skip

    def stats(self) -> dict:
        s = self.state
        return {
            "skip_attention": list(s.attention),
            "skip_mlp": list(s.mlp),
            "match_score": s.score,
            "optimizing": not s.done,
            "optimization_steps": s.steps - self._opt_steps_at_begin,
            "optimization_time": s.seconds - self._opt_seconds_at_begin,
            "optimization_steps_total": s.steps,
            "plain_steps": (self.payoff.plain_steps - self._plain_steps_at_begin) if self.payoff else 0,
        }
