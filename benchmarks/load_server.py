"""Load test for `specdecode serve`: requests/s, time to first token and latency percentiles,
per decoding method, per --max-num-seqs (one request at a time vs continuous batching) and per
concurrency level, over loopback only; optionally against transformers' own continuous batching.

For each method and each --max-num-seqs value it starts ``specdecode serve`` on 127.0.0.1 (or
uses --url, a server already running on this machine), sends a warm-up request, then for each
concurrency level ``--requests`` streamed greedy chat requests with at most that many in flight,
and reports per run:

* requests/s and generated tokens/s over the whole run (wall clock);
* time to first token (the first streamed text) and end-to-end latency: p50, p99, mean;
* mean accepted tokens per target forward (from the server's ``speculative`` field);
* whether every run gave the same answer to every prompt (greedy decoding is lossless, and a
  batched request's answer is the one it gets alone).

``--peer transformers-cb`` adds transformers' continuous batching (``ContinuousBatchingManager``,
plain greedy decoding, no speculation) as a peer: the same prompts, tokenized as the server does,
through one manager in this process (no HTTP; the same concurrency gate, the same metrics; TTFT is
the first generated token).

The load is bounded (at most 1000 requests per run, 64 in flight) and never leaves this machine.

    python benchmarks/load_server.py --model smollm2-135m --methods vanilla,pld --max-num-seqs 1,8 \
        --concurrency 1,4,8,16 --requests 32 --peer transformers-cb
    python benchmarks/load_server.py --url http://127.0.0.1:8000 --concurrency 1,4 --requests 16   # a running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

MAX_REQUESTS, MAX_CONCURRENCY = 1000, 64
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# Input-grounded tasks (edit, extract, rewrite): where the answer reuses the prompt's words, the
# common case for prompt lookup decoding, and realistic for a serving workload.
CODE = '''def average(values):
    total = 0
    for v in values:
        total = total + v
    return total / len(values)
'''
STORY = (
    "The lighthouse keeper, Mara, climbed the one hundred and twelve steps every evening at dusk. "
    "She lit the great lamp, wound the clockwork that turned the lens, and wrote the weather in a "
    "leather logbook. In forty years the light had never once failed, not even in the storm of 1987."
)
PROMPTS = [
    f"Add a docstring and type hints to this Python function. Reply with the code only.\n\n{CODE}",
    f"Rename the variable `total` to `running_sum` in this code and return the whole code.\n\n{CODE}",
    f"Rewrite this paragraph in the present tense.\n\n{STORY}",
    f"List every number that appears in this text, one per line, with the sentence it comes from.\n\n{STORY}",
    f"Summarize this paragraph in two sentences.\n\n{STORY}",
    "Explain what a lighthouse does, in three short sentences.",
    f"Translate this paragraph into simple English for a child.\n\n{STORY}",
    f"Make this function handle an empty list by returning 0.0. Reply with the code only.\n\n{CODE}",
]


@dataclass
class Outcome:
    prompt: int
    ok: bool
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0
    forwards: int = 0
    text: str = ""
    error: str = ""


@dataclass
class RunStats:
    method: str
    wall: float
    outcomes: list[Outcome] = field(default_factory=list)
    server: str = "specdecode"  # or "transformers-cb"
    max_num_seqs: int | None = None  # of the specdecode server (1 = one request at a time)
    concurrency: int = 1

    @property
    def label(self) -> str:
        if self.server != "specdecode":
            return self.server
        return f"{self.method} seqs={self.max_num_seqs if self.max_num_seqs is not None else '?'}"

    def summary(self) -> dict:
        ok = [o for o in self.outcomes if o.ok]
        ttfts = [o.ttft for o in ok if o.ttft is not None]
        lat = [o.latency for o in ok]
        tokens, forwards = sum(o.tokens for o in ok), sum(o.forwards for o in ok)
        return {
            "server": self.server,
            "method": self.method,
            "max_num_seqs": self.max_num_seqs,
            "concurrency": self.concurrency,
            "requests": len(self.outcomes),
            "errors": len(self.outcomes) - len(ok),
            "wall_s": round(self.wall, 3),
            "requests_per_s": round(len(ok) / self.wall, 3) if self.wall else 0.0,
            "tokens_per_s": round(tokens / self.wall, 1) if self.wall else 0.0,
            "ttft_p50_s": _pct(ttfts, 50), "ttft_p99_s": _pct(ttfts, 99),
            "ttft_mean_s": round(statistics.fmean(ttfts), 4) if ttfts else None,
            "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99),
            "latency_mean_s": round(statistics.fmean(lat), 4) if lat else None,
            "mean_accepted_tokens": round(tokens / forwards, 3) if forwards else None,
            "generated_tokens": tokens,
        }  # fmt: skip


def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (p99 of few samples is the slowest one, not an interpolation)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return round(ordered[int(rank) - 1], 4)


# ---- the load ---------------------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, model: str, chat: bool, prompt_index: int, max_tokens: int) -> Outcome:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    if chat:
        body["messages"] = [{"role": "user", "content": PROMPTS[prompt_index]}]
    else:  # models without a chat template (base models)
        body["prompt"] = PROMPTS[prompt_index]
    out = Outcome(prompt_index, ok=False)
    pieces: list[str] = []
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = event["error"]["message"]
                    return out
                for choice in event.get("choices", []):
                    text = choice["delta"].get("content") if chat else choice.get("text")
                    if text:
                        if out.ttft is None:
                            out.ttft = time.perf_counter() - t0
                        pieces.append(text)
                if event.get("usage"):
                    out.tokens = event["usage"]["completion_tokens"]
                    out.forwards = event.get("speculative", {}).get("target_forwards", 0)
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
        return out
    out.latency = time.perf_counter() - t0
    out.text = "".join(pieces)
    out.ok = True
    return out


async def run_load(url: str, api_key: str | None, method: str, max_num_seqs: int | None, args) -> list[RunStats]:
    """One run per concurrency level against the server at ``url`` (warmed up once)."""
    requests, max_tokens, chat = args.requests, args.max_tokens, args.endpoint == "chat"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    top = max(args.concurrency)
    limits = httpx.Limits(max_connections=top, max_keepalive_connections=top)
    runs = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        model = (await client.get("/v1/models")).raise_for_status().json()["data"][0]["id"]
        await one_request(client, model, chat, 0, min(max_tokens, 8))  # warm-up: not measured
        for concurrency in args.concurrency:
            _say(f"[{method} seqs={max_num_seqs}] {requests} requests, concurrency {concurrency}")
            gate = asyncio.Semaphore(concurrency)

            async def bounded(i: int) -> Outcome:
                async with gate:
                    return await one_request(client, model, chat, i % len(PROMPTS), max_tokens)

            t0 = time.perf_counter()
            outcomes = await asyncio.gather(*(bounded(i) for i in range(requests)))
            runs.append(RunStats(method, time.perf_counter() - t0, list(outcomes), "specdecode", max_num_seqs, concurrency))
    return runs


# ---- the peer: transformers' continuous batching, in this process ------------------------------


def prompt_ids(tokenizer, chat: bool) -> list[list[int]]:
    """The prompts' token ids as the server makes them (Engine.encode)."""
    out = []
    for text in PROMPTS:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        out.append([int(t) for t in ids])
    return out


def run_transformers_cb(args) -> list[RunStats]:
    """transformers' ContinuousBatchingManager over the same prompts: greedy, streamed (so the
    first token's time is known), at most ``concurrency`` requests in flight, one run per level."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from specdecode.hub import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=args.peer_dtype)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    config = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=eos if eos is not None else -1)
    ids = prompt_ids(tokenizer, args.endpoint == "chat")
    # The KV cache's size, fixed: left to itself on CPU, transformers takes 90% of the machine's RAM.
    page = args.peer_page_size
    per_request = -(-(max(map(len, ids)) + args.max_tokens + 1) // page)  # pages, rounded up
    num_blocks = args.peer_num_blocks or 2 * max(args.concurrency) * per_request
    cb = ContinuousBatchingConfig(
        max_batch_tokens=args.peer_max_batch_tokens, max_requests_per_batch=max(args.concurrency),
        allow_block_sharing=args.peer_block_sharing, page_size=page, num_blocks=num_blocks,
    )  # fmt: skip
    _say(f"[transformers-cb] KV cache: {num_blocks} blocks of {page} tokens, max_batch_tokens {args.peer_max_batch_tokens}")
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
    manager.start()
    counter = iter(range(10**9))

    async def one(index: int, max_tokens: int) -> Outcome:
        events: asyncio.Queue = asyncio.Queue()
        rid = f"load-{next(counter)}"
        manager.register_result_handler(rid, events.put_nowait)  # before the request: no output is missed
        out = Outcome(index, ok=False)
        t0 = time.perf_counter()
        if manager.add_request(ids[index], request_id=rid, max_new_tokens=max_tokens, streaming=True) is None:
            out.error = "the manager refused the request"
            return out
        while True:
            result = await events.get()
            if out.ttft is None and result.generated_tokens:
                out.ttft = time.perf_counter() - t0
            if result.is_finished():
                break
        if result.error is not None:
            out.error = str(result.error)
            return out
        out.latency = time.perf_counter() - t0
        tokens = list(result.generated_tokens)
        out.tokens = len(tokens)
        out.forwards = len(tokens)  # plain decoding: one token per forward
        out.text = tokenizer.decode([t for t in tokens if t not in eos_ids], skip_special_tokens=True)
        out.ok = True
        return out

    async def load() -> list[RunStats]:
        await one(0, min(args.max_tokens, 8))  # warm-up: not measured
        runs = []
        for concurrency in args.concurrency:
            _say(f"[transformers-cb] {args.requests} requests, concurrency {concurrency}")
            gate = asyncio.Semaphore(concurrency)

            async def bounded(i: int) -> Outcome:
                async with gate:
                    return await one(i % len(PROMPTS), args.max_tokens)

            t0 = time.perf_counter()
            outcomes = await asyncio.gather(*(bounded(i) for i in range(args.requests)))
            runs.append(RunStats("vanilla", time.perf_counter() - t0, list(outcomes), "transformers-cb", None, concurrency))
        return runs

    try:
        return asyncio.run(load())
    finally:
        manager.stop(block=True, timeout=30)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- servers ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, method: str, max_num_seqs: int, args) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix=f"serve-{method}-{max_num_seqs}-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "specdecode", "serve", "--model", model, "--method", method,
           "--host", "127.0.0.1", "--port", str(port), "--max-queue", str(max(64, *args.concurrency)),
           "--max-num-seqs", str(max_num_seqs), "--log-level", "warning"]  # fmt: skip
    if args.max_batch_tokens:
        cmd += ["--max-batch-tokens", str(args.max_batch_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += args.server_arg
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the {method} server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    sys.exit(f"the {method} server did not start in {args.startup_timeout}s:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---- main -------------------------------------------------------------------------------------


def _levels(text: str, name: str, p: argparse.ArgumentParser, high: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{name} must be a comma-separated list of integers, got {text!r}")
    if not values or not all(1 <= v <= high for v in values):
        p.error(f"{name} values must be in [1, {high}], got {text!r}")
    return values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model folder or known name (default smollm2-135m)")
    p.add_argument("--methods", default="vanilla,pld", help="comma-separated methods, one server each (default vanilla,pld)")
    p.add_argument("--max-num-seqs", default="1,8",
                   help="comma-separated --max-num-seqs of the servers: 1 = one request at a time, more = continuous "
                        "batching; one server per method and value (default 1,8)")  # fmt: skip
    p.add_argument("--max-batch-tokens", type=int, help="--max-batch-tokens of the servers (default: theirs)")
    p.add_argument("--url", help="benchmark this running server instead (loopback only); --methods is ignored")
    p.add_argument("--api-key", default=os.environ.get("SPECDECODE_API_KEY"), help="for --url servers that need one")
    p.add_argument("--requests", type=int, default=32, help=f"requests per run (at most {MAX_REQUESTS})")
    p.add_argument("--concurrency", default="1,4,8,16",
                   help=f"comma-separated requests in flight, one run per level (each at most {MAX_CONCURRENCY}; default 1,4,8,16)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="chat (default) or completions, for models without a chat template")
    p.add_argument("--threads", type=int, help="torch threads of the servers started here (and of the peer)")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for `specdecode serve` (repeatable)")  # fmt: skip
    p.add_argument("--peer", choices=("none", "transformers-cb"), default="none",
                   help="also run transformers' continuous batching (ContinuousBatchingManager) in this process")
    p.add_argument("--peer-max-batch-tokens", type=int, default=256, help="the peer's max_batch_tokens (default 256)")
    p.add_argument("--peer-page-size", type=int, default=64, help="tokens per page of the peer's paged KV cache (default 64)")
    p.add_argument("--peer-num-blocks", type=int,
                   help="blocks in the peer's KV cache (default: twice what the largest concurrency needs)")
    p.add_argument("--peer-dtype", default="auto", help="the peer's model dtype (default auto, as specdecode's)")
    p.add_argument("--peer-block-sharing", action="store_true",
                   help="let the peer share prompt-prefix cache blocks (off by default: specdecode has no prefix cache)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for a server to load")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    args = p.parse_args()
    if not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--requests must be in [1, {MAX_REQUESTS}]")
    args.concurrency = _levels(args.concurrency, "--concurrency", p, MAX_CONCURRENCY)
    seqs = _levels(args.max_num_seqs, "--max-num-seqs", p, 1024)
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}): this script only loads this machine")

    runs: list[RunStats] = []
    if args.url:
        health = httpx.get(f"{args.url}/health", timeout=10).json()
        method, n = health.get("method", "?"), (health.get("batching") or {}).get("max_num_seqs")
        runs += asyncio.run(run_load(args.url.rstrip("/"), args.api_key, method, n, args))
    else:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            for n in seqs:
                _say(f"[{method} seqs={n}] starting the server ...")
                proc, url, _ = start_server(args.model, method, n, args)
                try:
                    runs += asyncio.run(run_load(url, None, method, n, args))
                finally:
                    stop_server(proc)
    if args.peer == "transformers-cb":
        _say("[transformers-cb] loading the model ...")
        runs += run_transformers_cb(args)

    summaries = [r.summary() for r in runs]
    cols = [("label", "server", 22), ("concurrency", "conc", 4), ("requests_per_s", "req/s", 8),
            ("tokens_per_s", "tok/s", 8), ("ttft_p50_s", "TTFT p50", 8), ("ttft_p99_s", "TTFT p99", 8),
            ("latency_p50_s", "lat p50", 8), ("latency_p99_s", "lat p99", 8), ("mean_accepted_tokens", "acc tok", 7),
            ("errors", "errors", 6)]  # fmt: skip
    print(f"\nmodel {args.url or args.model}: {args.requests} requests per run, max_tokens {args.max_tokens}, "
          f"greedy streamed {args.endpoint}")  # fmt: skip
    print(" | ".join(f"{title:>{w}}" for _, title, w in cols))
    for r, s in zip(runs, summaries):
        row = {**s, "label": r.label}
        print(" | ".join(f"{'-' if row[k] is None else row[k]!s:>{w}}" for k, _, w in cols))
    # Each run against the first run at the same concurrency (e.g. batched vs one at a time).
    for level in args.concurrency:
        same = [(r, s) for r, s in zip(runs, summaries) if r.concurrency == level]
        if len(same) > 1 and same[0][1]["requests_per_s"] and same[0][1]["latency_p50_s"]:
            base_run, base = same[0]
            for r, s in same[1:]:
                if s["latency_p50_s"] and s["requests_per_s"]:
                    print(f"concurrency {level}: {r.label} vs {base_run.label}: "
                          f"{s['requests_per_s'] / base['requests_per_s']:.2f}x req/s, "
                          f"{base['latency_p50_s'] / s['latency_p50_s']:.2f}x faster p50 latency")  # fmt: skip
    identical = None
    mismatches: dict[str, int] = {}
    if len(runs) > 1:  # greedy decoding is lossless, batched or not: every run must answer alike
        first = {}
        for r in runs:
            for o in r.outcomes:
                if o.ok:
                    first.setdefault(o.prompt, o.text)
        for r in runs:
            bad = sum(1 for o in r.outcomes if o.ok and o.text != first[o.prompt])
            if bad:
                mismatches[f"{r.label} c={r.concurrency}"] = bad
        ours = [k for k in mismatches if not k.startswith("transformers-cb")]
        identical = not ours
        print(f"identical outputs across specdecode runs: {'yes' if identical else 'NO'}")
        for k, bad in mismatches.items():
            print(f"  {k}: {bad} answers differ from the first run's")
    errors = [(r.label, o.error) for r in runs for o in r.outcomes if not o.ok]
    for label, error in errors[:5]:
        print(f"error [{label}]: {error}", file=sys.stderr)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "api_key"}
        args.json.write_text(json.dumps({"config": config, "results": summaries, "identical_outputs": identical,
                                         "mismatches": mismatches}, indent=2, default=str))  # fmt: skip
    if errors or identical is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
