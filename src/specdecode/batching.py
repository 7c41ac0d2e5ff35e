"""Continuous batching: many requests decoded together, each exactly as it would be alone.

A ``BatchScheduler`` (built by ``Engine.batch``) holds up to ``max_num_seqs`` running requests,
each in a slot of a ``BatchedCache`` (``backends/batched.py``), and runs one target forward per
``step()`` over all of them. Requests join (``submit``) and leave (finish, ``cancel``) at step
boundaries. Each step's forward carries, per request:

* a prompt chunk, while its prompt is being prefilled (long prompts take several steps, so they
  do not stall the running requests), or
* its root token (the last token, not yet cached) and a draft from its own drafter.

The decoding rows of a step have a token budget, ``max_batch_tokens`` (default: where the
target's measured forward costs twice a one-token forward, ``costmodel.py``; 64 without a
measurement). It is shared in this order:

1. every decoding request's root (a running sequence is never stalled; when the roots alone fill
   the budget, nobody drafts: speculation turns off);
2. drafts: a seeded sampling request first gets its whole draft (its draft lengths must not depend
   on its neighbours, see below); the other draft tokens go one at a time to the request whose
   next draft node is most likely to be accepted (its path probability: the drafter's confidence
   where it gives one, else the request's own running acceptance at that depth).

Prompts are prefilled beside them, up to ``prefill_chunk`` prompt tokens per step (default
512), oldest request first. Prefill has its own allowance because its cost per token falls
with the chunk's size, unlike a decoding row's: squeezed into the decoding budget (as this
scheduler first did) a 200-token prompt took 25 steps of 8 rows each, through the row-by-row
path, and the requests waiting behind it spent most of their time in prefill.

Exactness. Greedy: a request's tokens are the target's argmax path whatever its drafts, so they
equal the request decoded alone (float32: up to float32 rounding, like every speculative step;
bf16: bit for bit where the row-invariance check made the linears exact and the prompt is
prefilled in one piece, as every prompt of up to ``prefill_chunk`` + 1 tokens is; see README).
Sampling: each request has its own generator (seeded from its own ``seed``); verification is
lossless speculative sampling per request, so each request's output has the target's
distribution. A seeded request's draft lengths follow its own
deterministic grow/shrink rule and its drafts are granted whole whenever the draft budget holds
them, so its output repeats the lone engine's for the same seed; when the budget cannot hold
them (speculation off, or many seeded requests at once), it stays correctly distributed but may
differ from the lone run.

Drafters hold per-request state, so every request gets its own copy of the engine's drafter
(the methods the registry declares ``batchable``, model-free ones, and hybrids of them; a custom
drafter may declare ``batchable = True``). Memory across requests is shared, not copied: suffix's
store of earlier requests (which a request joins when it ends) and token recycling's table (which
every request's verifications teach as they happen, as a lone engine's requests do in turn).
Drafts from such memory depend on what it holds when they are made, so a seeded request of those
methods repeats the lone engine's output only from the same memory; its distribution is exact
either way. Methods that keep a model cache in step with one sequence (their own or
the target's: sps, swift, quant) or read a datastore (rest) are refused.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field, replace

import torch

from .backends.batched import BatchedCache, Segment
from .decoding import Plan, Prefill, Request, synchronize
from . import checks as opt
from .drafters import registry
from .errors import InvalidArgument
from .sampling import SamplingParams
from .sizing import FixedSizing
from .results import GenerationResult, GenerationStats
from .text import OutputText

DEFAULT_MAX_BATCH_TOKENS = 64  # without a cost measurement
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per step: most prompts in one piece, as alone


def budget_from_cost(cost, context: int = 128, factor: float = 2.0, low: int = 16, high: int = 512) -> int:
    """The largest block whose forward costs at most ``factor`` times a one-token forward (the
    curve is extrapolated past its last measured size), within [low, high]."""
    t1 = cost.forward(1, context)
    best = 1
    for n in range(2, high + 1):
        if cost.forward(n, context) <= factor * t1:
            best = n
        else:
            break
    return max(low, min(best, high))


def check_batchable(engine) -> None:
    """Refuse engines whose method cannot run in a batch (see the module docstring): the
    drafter says whether it can follow one request beside others (``Drafter.batchable``, set
    from the registry for its methods)."""
    drafter = engine.drafter
    if drafter.batchable:
        return
    if drafter.name == "auto":
        raise InvalidArgument("method", "method 'auto' chooses per request and cannot batch; pick a method")
    raise InvalidArgument(
        "method", f"batched generation supports the methods {', '.join(registry.names(batchable=True))} "
        f"(and hybrids of them), not {drafter.name!r}, which runs one request at a time"
    )  # fmt: skip


@dataclass(frozen=True)
class BatchLimits:
    """How much a batch holds, checked once (InvalidArgument naming the limit).

    max_num_seqs: requests decoded at once (slots). max_batch_tokens: decoding rows per step
    (None: from the target's cost curve, see ``budget_from_cost``). prefill_chunk: prompt tokens
    prefilled per step. kv_cache_bytes: what the slots' KV caches may hold together (None: no
    budget); a request joins when the cache its prompt and ``max_new_tokens`` can reach fits
    beside the running requests', and is refused at once when it could never fit."""

    max_num_seqs: int = 8
    max_batch_tokens: int | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    kv_cache_bytes: int | None = None

    def __post_init__(self):
        opt.integer("max_num_seqs", self.max_num_seqs)
        opt.integer("prefill_chunk", self.prefill_chunk)
        for name in ("max_batch_tokens", "kv_cache_bytes"):
            if getattr(self, name) is not None:
                opt.integer(name, getattr(self, name))

    @classmethod
    def make(cls, max_num_seqs: int = 8, max_batch_tokens: int | None = None, prefill_chunk: int | None = None,
             kv_cache_bytes: int | None = None) -> "BatchLimits":  # fmt: skip
        """Like the constructor, but a missing prefill chunk means the default."""
        chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
        return cls(max_num_seqs, max_batch_tokens, chunk, kv_cache_bytes)


@dataclass
class StepOutput:
    """What one step did for one request: its new tokens, the text they released (stop strings
    held back), and whether the request finished."""

    request: "BatchRequest"
    token_ids: list[int]
    text: str
    finished: bool


@dataclass
class BatchRequest:
    """A handle on a submitted request. ``result`` is set when it finishes."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: list[str]
    status: str = "waiting"  # waiting, prefill, decode, done
    result: object = None  # GenerationResult once done
    # ---- internal state ----
    state: Request | None = None  # the decoding state (decoding.py), from admission on
    slot: int = -1
    prefilled: int = 0  # prompt tokens cached so far (of prompt[:-1])
    output: OutputText | None = None
    finish_reason: str = "length"
    cancelled: bool = False
    stats: object = None
    t_start: float = 0.0

    @property
    def finished(self) -> bool:
        return self.status == "done"


@dataclass
class _Plan:
    request: BatchRequest
    kind: str  # "prefill" or "decode"
    ids: list[int] = field(default_factory=list)  # a prefill chunk
    step: Plan | None = None  # a decoding step's draft

    @property
    def draft(self):
        return self.step.draft if self.step is not None else ()


class BatchScheduler:
    """Continuous batching over an engine's target; see the module docstring.

    ``submit`` queues a request and returns its handle; ``step`` runs one batched forward and
    returns what it produced; ``cancel`` ends a request at the next step. ``run`` steps until
    every request is done."""

    def __init__(self, engine, limits: BatchLimits | None = None, **settings):
        """``limits``, or its fields as keywords (``max_num_seqs=8``, ...)."""
        limits = limits if limits is not None else BatchLimits.make(**settings)
        check_batchable(engine)
        self.engine = engine
        self.limits = limits
        self.max_num_seqs = limits.max_num_seqs
        self.cache = BatchedCache(engine.target, limits.max_num_seqs)
        self.max_batch_tokens = limits.max_batch_tokens or self._default_budget()
        self.prefill_chunk = limits.prefill_chunk
        self.kv_bytes_per_token = engine.target.cache.bytes_per_token
        self.waiting: list[BatchRequest] = []
        self.running: list[BatchRequest] = []
        self._ids = itertools.count()
        self.steps = 0
        self.last_step: dict = {}  # what the last step's forward held (tests, metrics)

    def _default_budget(self) -> int:
        from .costmodel import CostModel

        try:
            cost = CostModel.for_target(self.engine.target, progress=False)
        except Exception:  # noqa: BLE001 - no measurement: a sane constant
            return DEFAULT_MAX_BATCH_TOKENS
        return budget_from_cost(cost)

    # ---- requests -----------------------------------------------------------------------------
    def submit(
        self,
        prompt,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> BatchRequest:
        """Queue a request (checked now); it joins the batch at the next step with a free slot."""
        ids, params, stops = self.engine.prepare(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop)
        req = BatchRequest(next(self._ids), ids, params, max_new_tokens, stops)
        budget = self.limits.kv_cache_bytes
        if budget is not None and self._kv_need(req) > budget:
            raise InvalidArgument(
                "max_new_tokens", f"the prompt ({len(ids)} tokens) and max_new_tokens ({max_new_tokens}) need "
                f"{self._kv_need(req) / 2**20:.1f} MiB of KV cache; the server's budget (--kv-cache-memory) holds "
                f"{budget / 2**20:.1f} MiB for all requests together: ask for fewer tokens"
            )  # fmt: skip
        self.waiting.append(req)
        return req

    def _kv_need(self, req: BatchRequest) -> int:
        """The most KV cache ``req`` can come to hold (its whole prompt and answer)."""
        return min(len(req.prompt_ids) + req.max_new_tokens, self.cache.max_length) * self.kv_bytes_per_token

    def _fits(self, req: BatchRequest) -> bool:
        budget = self.limits.kv_cache_bytes
        return budget is None or sum(self._kv_need(r) for r in self.running) + self._kv_need(req) <= budget

    def cancel(self, request: BatchRequest) -> None:
        """End ``request`` at the next step (its slot is freed; its result keeps what it produced,
        with finish_reason "cancelled")."""
        if not request.finished:
            request.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> None:
        while self.has_work:
            self.step()

    # ---- lifecycle ----------------------------------------------------------------------------
    def _admit(self, req: BatchRequest) -> None:
        eng = self.engine
        req.slot = self.cache.allocate()
        # The engine's drafter may hold a lone request not yet ended (suffix commits it to the
        # shared store at its next begin): end it now, so that no copy commits it again.
        eng.drafter.end()
        s = eng.seeded_sizing  # timing-free, so that a request's drafts do not depend on its neighbours'
        sizing = FixedSizing(s.initial, adaptive=s.adaptive, maximum=s.maximum)
        drafter = eng.drafter.fork(self.cache.view(req.slot))
        req.state = Request(list(req.prompt_ids), req.params, req.max_new_tokens, drafter, sizing, eng.eos_ids)
        req.state.begin(eng.target.device)
        req.output = OutputText(eng.tokenizer, req.stop, eng.eos_ids)
        req.stats = GenerationStats(prompt_tokens=len(req.prompt_ids), verify=eng.verify.describe(), lossy=eng.lossy)
        req.status = "prefill" if len(req.prompt_ids) > 1 else "decode"
        req.t_start = time.perf_counter()
        self.running.append(req)

    def _finish(self, req: BatchRequest, reason: str) -> str:
        """Close ``req``: its result, its slot back. Returns the text released now."""
        tail = req.output.close()
        req.state.drafter.end()  # e.g. suffix: the answer joins the shared store for later requests
        stats = req.stats
        stats.new_tokens = len(req.output.ids)
        stats.total_time = time.perf_counter() - req.t_start
        stats.method = {**req.state.drafter.stats(), **req.state.sizing.stats(), "batched": True,
                        "max_batch_tokens": self.max_batch_tokens, "max_num_seqs": self.max_num_seqs}  # fmt: skip
        req.result = GenerationResult(req.output.text, list(req.output.ids), list(req.prompt_ids), reason, stats)
        req.finish_reason = reason
        req.status = "done"
        self.cache.release(req.slot)
        self.running.remove(req)
        return tail

    # ---- one step -----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Admit, plan, run one forward, verify; the outputs of this step."""
        outputs: list[StepOutput] = []
        # Leave: cancelled requests (waiting ones never took a slot).
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._admit_cancelled(req, outputs)
        for req in [r for r in self.running if r.cancelled]:
            outputs.append(StepOutput(req, [], self._finish(req, "cancelled"), True))
        # Join: in submission order, while slots are free.
        while self.waiting and self.cache.free_slots and self._fits(self.waiting[0]):
            self._admit(self.waiting.pop(0))
        if not self.running:
            return outputs
        plans = self._plan()
        t0 = time.perf_counter()
        segments = [self._segment(p) for p in plans]
        layers = self.engine.drafter.hidden_layers or None  # a trained head reads hidden states
        if layers:
            logits, hidden = self.cache.forward(segments, hidden_layers=layers)
        else:
            logits, hidden = self.cache.forward(segments), [None] * len(segments)
        synchronize(self.engine.target.device)
        forward_seconds = time.perf_counter() - t0
        self.steps += 1
        self.last_step = {
            "roots": sum(p.kind == "decode" for p in plans),
            "drafts": sum(len(p.draft) for p in plans),
            "prefill": sum(len(p.ids) for p in plans if p.kind == "prefill"),
            "tokens": sum(int(s.ids.shape[0]) for s in segments),
            "per_request": {p.request.id: (p.kind, len(p.ids) if p.kind == "prefill" else len(p.draft)) for p in plans},
        }  # fmt: skip
        for plan, lg, hid in zip(plans, logits, hidden):
            req = plan.request
            if plan.kind == "prefill":
                if hid is not None:
                    req.state.drafter.observe_hidden(hid)
                req.prefilled += len(plan.ids)
                req.stats.add(Prefill(forward_seconds))
                if req.prefilled == len(req.prompt_ids) - 1:
                    req.status = "decode"
                continue
            out = self._verify(plan, lg, forward_seconds, hid)
            if out is not None:
                outputs.append(out)
        return outputs

    def _admit_cancelled(self, req: BatchRequest, outputs: list[StepOutput]) -> None:
        """A request cancelled before it joined: an empty result."""
        stats = GenerationStats(prompt_tokens=len(req.prompt_ids))
        req.result = GenerationResult("", [], list(req.prompt_ids), "cancelled", stats)
        req.finish_reason, req.status = "cancelled", "done"
        outputs.append(StepOutput(req, [], "", True))

    def _plan(self) -> list[_Plan]:
        budget = self.max_batch_tokens
        decoding = [r for r in self.running if r.status == "decode"]
        prefilling = [r for r in self.running if r.status == "prefill"]
        # Each decoding request proposes what its own sizing asks for (within its room).
        plans = {r.id: _Plan(r, "decode", step=r.state.plan(self.cache.lengths[r.slot], self.cache.max_length))
                 for r in decoding}  # fmt: skip
        # Seeded sampling requests first, whole (their draft lengths must not depend on others).
        grants = {r.id: 0 for r in decoding}
        left = max(0, budget - len(decoding))
        for r in decoding:
            if r.state.seeded_sampling:
                g = min(len(plans[r.id].step.draft), left)
                grants[r.id], left = g, left - g
        # The rest, one node at a time, where the next node is most likely to be accepted.
        path_probs = {r.id: r.state.acceptance.path_probabilities(plans[r.id].step.draft)
                      for r in decoding if not r.state.seeded_sampling}  # fmt: skip
        heap = [(-probs[0], r_id) for r_id, probs in path_probs.items() if probs]
        heapq.heapify(heap)
        while left > 0 and heap:
            _, r_id = heapq.heappop(heap)
            grants[r_id] += 1
            left -= 1
            probs = path_probs[r_id]
            if grants[r_id] < len(probs):
                heapq.heappush(heap, (-probs[grants[r_id]], r_id))
        for r in decoding:
            step = plans[r.id].step
            step.draft = step.draft.head(grants[r.id])
        # Prefill, oldest request first, within its own allowance.
        prefill_budget = self.prefill_chunk
        out = list(plans.values())
        for r in prefilling:
            if prefill_budget <= 0:
                break
            remaining = len(r.prompt_ids) - 1 - r.prefilled
            n = min(remaining, prefill_budget)
            prefill_budget -= n
            out.append(_Plan(r, "prefill", ids=r.prompt_ids[r.prefilled : r.prefilled + n]))
        return out

    def _segment(self, plan: _Plan) -> Segment:
        req = plan.request
        if plan.kind == "prefill":
            return Segment(req.slot, torch.tensor(plan.ids), logits=False)
        ids, positions, tree_mask = plan.step.block(req.state.tokens[-1])
        return Segment(req.slot, ids, positions=positions, tree_mask=tree_mask)

    def _verify(self, plan: _Plan, logits: torch.Tensor, forward_seconds: float, hidden=None) -> StepOutput | None:
        """The request's step settled (``Request.settle``, as a lone request's), then its text,
        stop strings and statistics (as ``Engine._generation``)."""
        req, eng = plan.request, self.engine
        slot = req.slot
        record = req.state.settle(plan.step, logits, eng.verify, lambda start, rows: self.cache.keep(slot, start, rows),
                                  forward_seconds, hidden)  # fmt: skip
        new = list(record.tokens)
        if not req.stats.first_token_time:
            req.stats.first_token_time = time.perf_counter() - req.t_start
        # Text and stop strings, as Engine._generation: the tokens after a stop string were never output.
        kept, piece = req.output.add(new)
        req.stats.add(replace(record, tokens=tuple(kept)))
        if req.output.stopped:
            return StepOutput(req, kept, piece + self._finish(req, "stop"), True)
        full = req.state.stopped or self.cache.lengths[slot] >= self.cache.max_length
        if req.output.finish_reason == "stop" or full:  # an EOS ("stop"), or no room left ("length")
            return StepOutput(req, new, piece + self._finish(req, req.output.finish_reason), True)
        return StepOutput(req, new, piece, False)


PER_REQUEST = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")


def generate_batch(engine, prompts, *, max_num_seqs: int = 8, max_batch_tokens: int | None = None,
                   prefill_chunk: int | None = None, stop=None, **settings) -> list:  # fmt: skip
    """``Engine.generate_batch``: every prompt through one scheduler; results in prompt order."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InvalidArgument("prompts", "expected a non-empty list of prompts")
    n = len(prompts)

    def per(name, value):
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise InvalidArgument(name, f"expected one value or a list of {n} (one per prompt), got {len(value)}")
            return list(value)
        return [value] * n

    columns = {name: per(name, settings[name]) for name in PER_REQUEST if name in settings}
    unknown = set(settings) - set(PER_REQUEST)
    if unknown:
        raise TypeError(f"generate_batch() got unexpected keyword arguments {sorted(unknown)}")
    if isinstance(stop, (list, tuple)) and stop and all(s is None or isinstance(s, (list, tuple)) for s in stop):
        stops = per("stop", stop)  # one list per prompt
    else:
        stops = [stop] * n
    scheduler = BatchScheduler(engine, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens, prefill_chunk=prefill_chunk)
    handles = [
        scheduler.submit(p, stop=stops[i], **{name: col[i] for name, col in columns.items()})
        for i, p in enumerate(prompts)
    ]
    scheduler.run()
    return [h.result for h in handles]
