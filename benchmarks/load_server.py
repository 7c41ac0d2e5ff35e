"""Load test for `specdecode serve`: requests/s, time to first token and latency percentiles,
vanilla decoding against a speculative method (pld by default), over loopback only.

For each method it starts ``specdecode serve`` on 127.0.0.1 (or uses --url, a server already
running on this machine), sends a warm-up request, then ``--requests`` streamed greedy chat
requests with at most ``--concurrency`` in flight, and reports:

* requests/s and generated tokens/s over the whole run (wall clock);
* time to first token (the first streamed text) and end-to-end latency: p50, p99, mean;
* mean accepted tokens per target forward (from the server's ``speculative`` field);
* whether every method gave the same answer to every prompt (greedy decoding is lossless).

The load is bounded (at most 1000 requests, 64 in flight) and never leaves this machine.

    python benchmarks/load_server.py --model smollm2-135m --concurrency 4 --requests 32
    python benchmarks/load_server.py --url http://127.0.0.1:8000 --requests 16   # a running server
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

    def summary(self) -> dict:
        ok = [o for o in self.outcomes if o.ok]
        ttfts = [o.ttft for o in ok if o.ttft is not None]
        lat = [o.latency for o in ok]
        tokens, forwards = sum(o.tokens for o in ok), sum(o.forwards for o in ok)
        return {
            "method": self.method,
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


async def run_load(url: str, api_key: str | None, method: str, args) -> RunStats:
    requests, concurrency, max_tokens, chat = args.requests, args.concurrency, args.max_tokens, args.endpoint == "chat"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        model = (await client.get("/v1/models")).raise_for_status().json()["data"][0]["id"]
        await one_request(client, model, chat, 0, min(max_tokens, 8))  # warm-up: not measured
        gate = asyncio.Semaphore(concurrency)

        async def bounded(i: int) -> Outcome:
            async with gate:
                return await one_request(client, model, chat, i % len(PROMPTS), max_tokens)

        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(bounded(i) for i in range(requests)))
        return RunStats(method, time.perf_counter() - t0, list(outcomes))


# ---- servers ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, method: str, args) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix=f"serve-{method}-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "specdecode", "serve", "--model", model, "--method", method,
           "--host", "127.0.0.1", "--port", str(port), "--max-queue", str(max(64, args.concurrency)),
           "--log-level", "warning", *args.server_arg]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model folder or known name (default smollm2-135m)")
    p.add_argument("--methods", default="vanilla,pld", help="comma-separated methods, one server each (default vanilla,pld)")
    p.add_argument("--url", help="benchmark this running server instead (loopback only); --methods is ignored")
    p.add_argument("--api-key", default=os.environ.get("SPECDECODE_API_KEY"), help="for --url servers that need one")
    p.add_argument("--requests", type=int, default=32, help=f"requests per method (at most {MAX_REQUESTS})")
    p.add_argument("--concurrency", type=int, default=4, help=f"requests in flight (at most {MAX_CONCURRENCY})")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="chat (default) or completions, for models without a chat template")
    p.add_argument("--threads", type=int, help="torch threads of the servers started here")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for `specdecode serve` (repeatable)")  # fmt: skip
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for a server to load")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    args = p.parse_args()
    if not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--requests must be in [1, {MAX_REQUESTS}]")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        p.error(f"--concurrency must be in [1, {MAX_CONCURRENCY}]")
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}): this script only loads this machine")

    runs: list[RunStats] = []
    if args.url:
        method = httpx.get(f"{args.url}/health", timeout=10).json().get("method", "?")
        runs.append(asyncio.run(run_load(args.url.rstrip("/"), args.api_key, method, args)))
    else:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            print(f"[{method}] starting the server ...", file=sys.stderr, flush=True)
            proc, url, _ = start_server(args.model, method, args)
            try:
                print(f"[{method}] {args.requests} requests, concurrency {args.concurrency}", file=sys.stderr, flush=True)
                runs.append(asyncio.run(run_load(url, None, method, args)))
            finally:
                stop_server(proc)

    summaries = [r.summary() for r in runs]
    cols = [("method", "method"), ("requests_per_s", "req/s"), ("tokens_per_s", "tok/s"),
            ("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"), ("latency_p50_s", "lat p50"),
            ("latency_p99_s", "lat p99"), ("mean_accepted_tokens", "acc tok"), ("errors", "errors")]  # fmt: skip
    print(f"\nmodel {args.url or args.model}: {args.requests} requests, concurrency {args.concurrency}, "
          f"max_tokens {args.max_tokens}, greedy streamed {args.endpoint}")  # fmt: skip
    print(" | ".join(f"{title:>9}" for _, title in cols))
    for s in summaries:
        print(" | ".join(f"{'-' if s[k] is None else s[k]!s:>9}" for k, _ in cols))
    if len(summaries) > 1 and summaries[0]["latency_p50_s"]:
        base = summaries[0]
        for s in summaries[1:]:
            if s["latency_p50_s"] and s["requests_per_s"]:
                print(f"{s['method']} vs {base['method']}: {s['requests_per_s'] / base['requests_per_s']:.2f}x req/s, "
                      f"{base['latency_p50_s'] / s['latency_p50_s']:.2f}x faster p50 latency")  # fmt: skip
    identical = None
    if len(runs) > 1:  # greedy speculative decoding is lossless: every method must answer alike
        answers = [{o.prompt: o.text for o in r.outcomes if o.ok} for r in runs]
        identical = all(a == answers[0] for a in answers[1:])
        print(f"identical outputs across methods: {'yes' if identical else 'NO'}")
    errors = [(r.method, o.error) for r in runs for o in r.outcomes if not o.ok]
    for method, error in errors[:5]:
        print(f"error [{method}]: {error}", file=sys.stderr)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "api_key"}
        args.json.write_text(json.dumps({"config": config, "results": summaries, "identical_outputs": identical}, indent=2, default=str))  # fmt: skip
    if errors or identical is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
