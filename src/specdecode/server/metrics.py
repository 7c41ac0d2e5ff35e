"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Written by hand (a few counters, gauges and histograms) to keep the server's dependencies to
fastapi, uvicorn and pydantic. Updated from the event loop and read by /metrics; a lock keeps a
scrape consistent.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

from ..results import GenerationResult

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class BatchStats:
    """What the continuous-batching scheduler's steps held (fed by the worker thread after every
    step, read by /metrics and /health)."""

    def __init__(self, max_num_seqs: int, max_batch_tokens: int):
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        self._lock = threading.Lock()
        self.steps = 0
        self.tokens = 0  # tokens in the steps' forwards: roots + drafts + prompt chunks
        self.roots = 0
        self.drafts = 0
        self.prefill = 0
        self.draft_room = 0  # per step: the budget left after the roots
        self.last: dict = {}
        self.per_step = Histogram(
            "specdecode_batch_tokens_per_step", "Tokens in one batched target forward (all running sequences).",
            TOKEN_BUCKETS,
        )  # fmt: skip

    def observe_step(self, step: dict, max_batch_tokens: int) -> None:
        with self._lock:
            self.steps += 1
            self.tokens += step.get("tokens", 0)
            self.roots += step.get("roots", 0)
            self.drafts += step.get("drafts", 0)
            self.prefill += step.get("prefill", 0)
            self.draft_room += max(0, max_batch_tokens - step.get("roots", 0))
            self.last = {k: step.get(k, 0) for k in ("tokens", "roots", "drafts", "prefill")}
            self.per_step.observe(step.get("tokens", 0))

    def summary(self) -> dict:
        """/health's view: means over all steps so far."""
        with self._lock:
            return {
                "steps": self.steps,
                "mean_batch_tokens_per_step": round(self.tokens / self.steps, 3) if self.steps else 0.0,
                "mean_sequences_per_step": round(self.roots / self.steps, 3) if self.steps else 0.0,
                "speculation_budget_used": round(self.drafts / self.draft_room, 4) if self.draft_room else 0.0,
                "last_step": dict(self.last),
            }

    def render(self, metric) -> list[str]:
        with self._lock:
            used = self.drafts / self.draft_room if self.draft_room else 0.0
            lines = metric("specdecode_max_num_seqs", "gauge", "Sequences the scheduler runs at once (--max-num-seqs).", self.max_num_seqs)  # fmt: skip
            lines += metric("specdecode_max_batch_tokens", "gauge", "Token budget of one batched step (--max-batch-tokens).", self.max_batch_tokens)  # fmt: skip
            lines += metric("specdecode_batch_steps_total", "counter", "Batched target forwards (scheduler steps).", self.steps)  # fmt: skip
            lines += metric("specdecode_batch_tokens_total", "counter", "Tokens in the batched forwards: roots, drafts and prompt chunks.", self.tokens)  # fmt: skip
            lines += metric("specdecode_batch_decode_tokens_total", "counter", "Root tokens in the batched forwards (one per decoding sequence per step).", self.roots)  # fmt: skip
            lines += metric("specdecode_batch_draft_tokens_total", "counter", "Draft tokens verified in the batched forwards.", self.drafts)  # fmt: skip
            lines += metric("specdecode_batch_prefill_tokens_total", "counter", "Prompt tokens prefilled in the batched forwards.", self.prefill)  # fmt: skip
            lines += metric("specdecode_speculation_budget_used", "gauge", "Draft tokens over the room the step budget left after the roots, over all steps (0 to 1).", used)  # fmt: skip
            lines += self.per_step.render()
        return lines


class Metrics:
    def __init__(self, model: str, method: str):
        self.model, self.method = model, method
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.target_forwards = 0
        self.drafted_tokens = 0
        self.accepted_draft_tokens = 0
        self.latency = Histogram("specdecode_request_latency_seconds", "Time from request arrival to the last token.")
        self.ttft = Histogram("specdecode_time_to_first_token_seconds", "Time from request arrival to the first generated text.")  # fmt: skip
        self.queue_wait = Histogram("specdecode_queue_wait_seconds", "Time a request waited for the worker.")

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def observe(self, result: GenerationResult, *, latency: float, ttft: float | None, queue_wait: float) -> None:
        s = result.stats
        with self._lock:
            self.prompt_tokens += s.prompt_tokens
            self.generated_tokens += s.new_tokens
            self.target_forwards += s.target_forwards
            self.drafted_tokens += s.drafted_tokens
            self.accepted_draft_tokens += s.accepted_draft_tokens
            self.latency.observe(latency)
            self.queue_wait.observe(queue_wait)
            if ttft is not None:
                self.ttft.observe(ttft)

    def render(self, *, queue_length: int, running: int, cancelled: int, batch: BatchStats | None = None) -> str:
        def metric(name: str, kind: str, help: str, value, labels: str = "") -> list[str]:
            return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{labels} {_num(value)}"]

        with self._lock:
            # Tokens per verification forward over all finished requests: the speed-up that
            # speculation buys (1.0 for vanilla decoding).
            mean_accepted = self.generated_tokens / self.target_forwards if self.target_forwards else 0.0
            info = f'{{model="{_label(self.model)}",method="{_label(self.method)}"}}'
            lines = metric("specdecode_info", "gauge", "The served model and decoding method.", 1, info)
            lines += ["# HELP specdecode_requests_total HTTP requests answered, by endpoint and status.",
                      "# TYPE specdecode_requests_total counter"]  # fmt: skip
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'specdecode_requests_total{{endpoint="{_label(endpoint)}",status="{status}"}} {n}')
            lines += metric("specdecode_requests_cancelled_total", "counter", "Generations stopped because the client disconnected.", cancelled)  # fmt: skip
            lines += metric("specdecode_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens)  # fmt: skip
            lines += metric("specdecode_generated_tokens_total", "counter", "Tokens generated by finished requests.", self.generated_tokens)  # fmt: skip
            lines += metric("specdecode_target_forwards_total", "counter", "Target-model verification forwards (decoding steps).", self.target_forwards)  # fmt: skip
            lines += metric("specdecode_drafted_tokens_total", "counter", "Draft tokens proposed.", self.drafted_tokens)
            lines += metric("specdecode_accepted_draft_tokens_total", "counter", "Draft tokens accepted.", self.accepted_draft_tokens)  # fmt: skip
            lines += metric("specdecode_mean_accepted_tokens", "gauge", "Tokens generated per target forward, over all finished requests.", mean_accepted)  # fmt: skip
            lines += metric("specdecode_queue_length", "gauge", "Requests waiting for the worker.", queue_length)
            lines += metric("specdecode_requests_running", "gauge", "Requests being generated (running sequences; at most --max-num-seqs).", running)  # fmt: skip
            lines += metric("specdecode_batching", "gauge", "1 when requests are decoded together (continuous batching), 0 when one at a time.", int(batch is not None))  # fmt: skip
            for h in (self.latency, self.ttft, self.queue_wait):
                lines += h.render()
        if batch is not None:
            lines += batch.render(metric)
        return "\n".join(lines) + "\n"
