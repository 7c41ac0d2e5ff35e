"""`specdecode serve` with continuous batching (--max-num-seqs > 1): many requests decoded together,
each answer what the request gets alone.

* ``batched``: the real CLI in a subprocess, --max-num-seqs 4, method vanilla and pld, on a copy of
  stories260K with a chat template; 16 concurrent OpenAI clients, streamed and not, compared with
  ``Engine.generate`` in this process.
* ``one_at_a_time``: the CLI with --max-num-seqs 1: today's worker, no batching fields.
* in-process servers (``create_app`` under uvicorn in a thread, or TestClient) whose scheduler
  steps are slowed down, for disconnects, failures, shutdown and the refused-method fallback.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from specdecode import Engine  # noqa: E402
from .conftest import make_chat_model

torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPTS = ["Once upon a time", "The cat", "Tom had a red ball", "One day, a little bird", "Lily and Ben",
           "The sun was", "A big dog", "Mom said"]  # fmt: skip
MAX_NUM_SEQS = 4
MAX_BATCH_TOKENS = 32  # fixed: no cost measurement at startup


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, stories_path) -> Path:
    return make_chat_model(tmp_path_factory.mktemp("models") / "tinychat", stories_path, CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def engine(chat_model) -> Engine:
    return Engine.from_pretrained(chat_model, "vanilla", progress=False)


@pytest.fixture(scope="module")
def reference(engine):
    """Lone answers (Engine.generate), memoized."""
    cache: dict = {}

    def expected(prompt, max_tokens: int, temperature: float = 0.0, **kwargs):
        key = (json.dumps(prompt), max_tokens, temperature, json.dumps(kwargs, sort_keys=True))
        if key not in cache:
            cache[key] = engine.generate(prompt, max_new_tokens=max_tokens, temperature=temperature, **kwargs)
        return cache[key]

    return expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_cli(chat_model: Path, log: Path, method: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "specdecode", "serve", "--model", str(chat_model), "--method", method,
           "--port", str(port), "--max-queue", "64", "--threads", "1", "--log-level", "warning", *extra]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with status {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the server did not start:\n{log.read_text()}")


def _stop_cli(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module", params=["vanilla", "pld"])
def batched(request, chat_model, tmp_path_factory):
    """(url, method, log) of the CLI serving with --max-num-seqs 4."""
    log = tmp_path_factory.mktemp("log") / f"serve-{request.param}.log"
    proc, url = _start_cli(chat_model, log, request.param, "--max-num-seqs", str(MAX_NUM_SEQS),
                           "--max-batch-tokens", str(MAX_BATCH_TOKENS))  # fmt: skip
    yield url, request.param, log
    _stop_cli(proc)


@pytest.fixture(scope="module")
def one_at_a_time(chat_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "serve-1.log"
    proc, url = _start_cli(chat_model, log, "pld", "--max-num-seqs", "1")
    yield url, log
    _stop_cli(proc)


def _metrics(url: str) -> dict[str, float]:
    r = httpx.get(f"{url}/metrics", timeout=5)
    assert r.status_code == 200
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _jobs(max_tokens: int) -> list[tuple[int, object, int, int]]:
    """(client, prompt, kind, max_tokens): 16 clients x 3 requests, four kinds (completion, streamed
    completion, chat, streamed chat), lengths varying so requests leave the batch at different steps."""
    jobs = []
    for i in range(16):
        for j in range(3):
            prompt, kind = PROMPTS[(i + j) % len(PROMPTS)], (i + j * 3) % 4
            if kind >= 2:
                prompt = [{"role": "user", "content": prompt}]
            jobs.append((i, prompt, kind, max_tokens - 7 * ((i + j) % 3)))
    return jobs


def _ask(c, prompt, kind: int, **args) -> tuple[str, dict]:
    """(text, speculative field) of one request of ``kind``."""
    if kind == 0:
        r = c.completions.create(prompt=prompt, **args)
        return r.choices[0].text, r.model_extra["speculative"]
    if kind == 1:
        chunks = list(c.completions.create(prompt=prompt, stream=True, **args))
        return "".join(ch.choices[0].text for ch in chunks), chunks[-1].model_extra["speculative"]
    if kind == 2:
        r = c.chat.completions.create(messages=prompt, **args)
        return r.choices[0].message.content, r.model_extra["speculative"]
    chunks = list(c.chat.completions.create(messages=prompt, stream=True, **args))
    return "".join(ch.choices[0].delta.content or "" for ch in chunks), chunks[-1].model_extra["speculative"]


def _run_clients(url: str, model: str, jobs) -> list[tuple[object, int, str, dict]]:
    def run_client(i: int):
        out = []
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as c:
            for _, prompt, kind, max_tokens in (job for job in jobs if job[0] == i):
                text, spec = _ask(c, prompt, kind, model=model, max_tokens=max_tokens, temperature=0)
                out.append((prompt, max_tokens, text, spec))
        return out

    with ThreadPoolExecutor(16) as pool:
        return [a for answers in pool.map(run_client, range(16)) for a in answers]


# ---- batched: exactness, metrics, health --------------------------------------------------------


def test_sixteen_clients_get_their_lone_answers(batched, reference):
    url, method, _ = batched
    jobs = _jobs(40)
    expected = {(json.dumps(p), n): reference(p, n).text for _, p, _, n in jobs}
    before = _metrics(url)
    results = _run_clients(url, "tinychat", jobs)
    assert len(results) == 48
    wrong = [(p, n, got, expected[(json.dumps(p), n)]) for p, n, got, _ in results if got != expected[(json.dumps(p), n)]]
    assert not wrong, wrong[:3]
    for *_, spec in results:  # every answer came through the scheduler
        assert spec["method"] == method and spec["method_stats"]["batched"] is True
        assert spec["method_stats"]["max_num_seqs"] == MAX_NUM_SEQS
    after = _metrics(url)
    tokens = sum(n for _, _, _, n in jobs)
    assert after["specdecode_generated_tokens_total"] - before["specdecode_generated_tokens_total"] == tokens
    # Requests really were decoded together: fewer batched forwards than the requests' own steps.
    forwards = after["specdecode_target_forwards_total"] - before["specdecode_target_forwards_total"]
    steps = after["specdecode_batch_steps_total"] - before["specdecode_batch_steps_total"]
    roots = after["specdecode_batch_decode_tokens_total"] - before["specdecode_batch_decode_tokens_total"]
    assert roots == forwards  # one root per request per step it decoded in
    assert 0 < steps < forwards / 2, (steps, forwards)
    assert after["specdecode_batching"] == 1
    assert after["specdecode_max_num_seqs"] == MAX_NUM_SEQS and after["specdecode_max_batch_tokens"] == MAX_BATCH_TOKENS
    assert after["specdecode_requests_running"] == 0 and after["specdecode_queue_length"] == 0
    assert after['specdecode_batch_tokens_per_step_bucket{le="+Inf"}'] == after["specdecode_batch_steps_total"]
    assert after["specdecode_batch_tokens_per_step_sum"] == after["specdecode_batch_tokens_total"]
    # Every step's tokens are its roots, drafts and prompt chunks (the budget per step itself is
    # test_batched's: prompt chunks have their own allowance, so a step may hold more than 32).
    assert after["specdecode_batch_tokens_total"] == sum(
        after[f"specdecode_batch_{kind}_tokens_total"] for kind in ("decode", "draft", "prefill")
    )
    used = after["specdecode_speculation_budget_used"]
    if method == "vanilla":
        assert after["specdecode_batch_draft_tokens_total"] == 0 and used == 0
    else:
        assert after["specdecode_batch_draft_tokens_total"] > 0 and 0 < used <= 1
    health = _health(url)
    b = health["batching"]
    assert health["running"] == 0
    assert b["enabled"] is True and b["max_num_seqs"] == MAX_NUM_SEQS and b["max_batch_tokens"] == MAX_BATCH_TOKENS
    assert b["steps"] == after["specdecode_batch_steps_total"]
    assert 1 < b["mean_sequences_per_step"] <= MAX_NUM_SEQS
    assert 1 < b["mean_batch_tokens_per_step"] <= MAX_BATCH_TOKENS
    assert b["speculation_budget_used"] == pytest.approx(used, abs=1e-4)


def test_stop_strings_seeds_and_lengths_per_request(batched, reference):
    """Requests with different settings in one batch: each gets its own stop strings, max_tokens
    and (vanilla: exactly its lone sampling) seed."""
    url, method, _ = batched
    asks = [dict(prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=["Lily"]),
            dict(prompt=PROMPTS[1], max_tokens=3, temperature=0),
            dict(prompt=PROMPTS[2], max_tokens=25, temperature=0, stop=[".", "!"]),
            dict(prompt=PROMPTS[3], max_tokens=20, temperature=0.8, seed=11),
            dict(prompt=PROMPTS[4], max_tokens=20, temperature=0.9, top_k=20, seed=5),
            dict(prompt=PROMPTS[5], max_tokens=30, temperature=0)]  # fmt: skip

    def send(a):
        return httpx.post(f"{url}/v1/completions", json={"model": "tinychat", **a}, timeout=60).json()

    for _ in range(2):  # the seeded answers repeat
        with ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(send, asks))
        for a, r in zip(asks, answers):
            choice = r["choices"][0]
            kwargs = {k: a[k] for k in ("stop", "seed", "top_k") if k in a}
            want = reference(a["prompt"], a["max_tokens"], a["temperature"], **kwargs)
            if a["temperature"] == 0 or method == "vanilla":
                assert choice["text"] == want.text, a
                assert choice["finish_reason"] == want.finish_reason, a
            assert r["usage"]["completion_tokens"] <= a["max_tokens"]
            if a["temperature"] > 0:
                assert r["usage"]["completion_tokens"] == a["max_tokens"] or choice["finish_reason"] == "stop"
    assert answers[0]["choices"][0]["finish_reason"] == "stop" and "Lily" not in answers[0]["choices"][0]["text"]
    assert answers[1]["usage"]["completion_tokens"] == 3


def test_cli_says_it_batches(batched):
    url, _, log = batched
    assert "continuous batching: up to 4 requests at once, 32 tokens per step (KV cache" in log.read_text()
    assert _health(url)["batching"]["kv_cache_bytes"] > 0


# ---- --max-num-seqs 1: as before ----------------------------------------------------------------


def test_max_num_seqs_1_runs_one_at_a_time(one_at_a_time, reference):
    url, log = one_at_a_time
    jobs = [job for job in _jobs(16) if job[0] < 8]
    results = _run_clients(url, "tinychat", jobs)
    assert len(results) == 24
    for prompt, n, text, spec in results:
        assert text == reference(prompt, n).text
        assert "batched" not in spec["method_stats"]  # Engine.stream, not the scheduler
    health = _health(url)
    assert health["batching"] == {"enabled": False, "reason": "--max-num-seqs 1", "max_num_seqs": 1}
    m = _metrics(url)
    assert m["specdecode_batching"] == 0
    assert not any(k.startswith("specdecode_batch_") for k in m)
    assert "one request at a time: --max-num-seqs 1" in log.read_text()


# ---- in-process servers: disconnects, failures, shutdown, refused methods ------------------------


class _Served:
    def __init__(self, app):
        self.app = app
        self.srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.srv.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.srv.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the in-thread server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.srv.servers[0].sockets[0].getsockname()[1]}"

    def close(self):
        self.srv.should_exit = True
        self.thread.join(10)


class SlowSteps:
    """Slows the scheduler's steps (``delay`` seconds each) and can make the next one raise."""

    def __init__(self, worker, delay: float):
        self.worker, self.delay = worker, delay
        self.fail_next = False
        self.steps = 0
        self._patch(worker.scheduler)

    def _patch(self, scheduler) -> None:
        step = scheduler.step

        def slow_step():
            time.sleep(self.delay)
            self.steps += 1
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("simulated failure in a batched step")
            return step()

        scheduler.step = slow_step

    def repatch(self) -> None:  # after the worker rebuilt its scheduler
        if "step" not in vars(self.worker.scheduler):
            self._patch(self.worker.scheduler)


@pytest.fixture
def slow(engine):
    """(url, SlowSteps) of an in-thread server, 2 sequences, each step taking >= 10 ms."""
    from specdecode.server import create_app

    app = create_app(engine, model_name="m", max_num_seqs=2, max_batch_tokens=16)
    served = _Served(app)
    yield served.url, SlowSteps(app.state.server.worker, 0.01)
    served.close()


LONG = {"model": "m", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}  # >= 4 s in 10-ms steps


def test_disconnect_mid_stream_frees_the_slot(slow, reference):
    url, steps = slow
    before = _metrics(url)
    other: dict = {}
    t = threading.Thread(target=lambda: other.update(r=httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 450}, timeout=60)))  # fmt: skip
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            t.start()
            _wait_for(lambda: _health(url)["running"] == 2)  # both slots taken
            assert next(line for line in lines if line).startswith("data: ")
    # The client is gone: its slot is freed at the next step while the other request runs on ...
    _wait_for(lambda: _metrics(url)["specdecode_requests_cancelled_total"] == before["specdecode_requests_cancelled_total"] + 1, 3)  # fmt: skip
    assert _health(url)["running"] == 1 and t.is_alive()
    # ... so a new request gets that slot at once, not after the long one.
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 5}, timeout=10)
    assert r.status_code == 200 and time.monotonic() - t0 < 2
    assert r.json()["choices"][0]["text"] == reference("Once upon a time", 5).text
    t.join(60)
    assert other["r"].status_code == 200
    assert other["r"].json()["choices"][0]["text"] == reference("Once upon a time", 450).text
    after = _metrics(url)
    # The cancelled request's tokens are not counted as a finished request's.
    assert after["specdecode_generated_tokens_total"] - before["specdecode_generated_tokens_total"] == 455
    assert _health(url)["running"] == 0


def test_disconnect_while_waiting_for_a_slot(slow, reference):
    url, steps = slow
    before = _metrics(url)["specdecode_requests_cancelled_total"]
    threads = [threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",), kwargs=dict(json={**LONG, "max_tokens": 100}, timeout=60)) for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    _wait_for(lambda: _health(url)["running"] == 2)
    with pytest.raises(httpx.ReadTimeout):  # waits in the queue, gives up
        httpx.post(f"{url}/v1/completions", json=LONG, timeout=httpx.Timeout(10, read=0.3))
    for t in threads:
        t.join(60)
    _wait_for(lambda: _metrics(url)["specdecode_requests_cancelled_total"] == before + 1)
    assert _health(url)["running"] == 0 and _health(url)["queue_length"] == 0


def test_failed_step_is_contained(slow, reference):
    url, steps = slow
    body = {"model": "m", "prompt": "The cat", "max_tokens": 6, "temperature": 0}
    steps.fail_next = True
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
    assert r.status_code == 500 and "simulated failure" in r.json()["error"]["message"]
    steps.repatch()
    steps.fail_next = True
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=10) as s:
        events = [line[6:] for line in s.iter_lines() if line]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
    steps.repatch()
    # The worker lives on, batching, and answers correctly.
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda p: httpx.post(f"{url}/v1/completions", json={**body, "prompt": p}, timeout=30), PROMPTS[:3]))  # fmt: skip
    for p, a in zip(PROMPTS[:3], answers):
        assert a.status_code == 200 and a.json()["choices"][0]["text"] == reference(p, 6).text
    assert _health(url)["status"] == "ok" and _health(url)["batching"]["enabled"] is True


def test_failed_step_blames_only_its_request(engine, reference, monkeypatch, caplog):
    """A step that raises because of one request (a bug hit by its prompt): the requests beside it
    are replayed one at a time and finish with their lone answers (streams without repeating
    text); only that request gets the error."""
    from specdecode.batching import BatchScheduler
    from specdecode.server import create_app

    poisoned, real = engine.encode("Lily and Ben"), BatchScheduler.step

    def step(self):
        time.sleep(0.01)
        if any(r.prompt_ids == poisoned for r in self.waiting + self.running):
            raise RuntimeError("simulated bug hit by one request")
        return real(self)

    monkeypatch.setattr(BatchScheduler, "step", step)
    app = create_app(engine, model_name="m", max_num_seqs=4, max_batch_tokens=16)
    served = _Served(app)
    url, results = served.url, {}

    def send(name: str, prompt: str, n: int, stream: bool, **kw) -> None:
        body = {"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream, **kw}
        if stream:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                results[name] = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        else:
            results[name] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)

    others = [threading.Thread(target=send, args=("a", PROMPTS[0], 60, True)),
              threading.Thread(target=send, args=("b", PROMPTS[1], 60, False)),
              threading.Thread(target=send, args=("s", PROMPTS[2], 40, True), kwargs={"temperature": 0.8, "seed": 3})]  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING, logger="specdecode.server"):
            for t in others:
                t.start()
            _wait_for(lambda: _health(url)["running"] == 3)
            time.sleep(0.2)  # the streams have sent text by now
            send("c", "Lily and Ben", 20, False)
            for t in others:
                t.join(60)
        assert results["c"].status_code == 500 and "simulated bug" in results["c"].json()["error"]["message"]
        assert any("replaying its 4 requests" in r.getMessage() for r in caplog.records)
        a_events, s_events = results["a"], results["s"]
        assert not any("error" in e for e in a_events + s_events)
        assert "".join(e["choices"][0]["text"] for e in a_events if e["choices"]) == reference(PROMPTS[0], 60).text
        assert a_events[-1]["choices"][0]["finish_reason"] == "length"
        want = reference(PROMPTS[2], 40, 0.8, seed=3).text
        assert "".join(e["choices"][0]["text"] for e in s_events if e["choices"]) == want
        assert results["b"].status_code == 200 and results["b"].json()["choices"][0]["text"] == reference(PROMPTS[1], 60).text
        health = _health(url)
        assert health["status"] == "ok" and health["running"] == 0 and health["batching"]["enabled"] is True
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": PROMPTS[3], "max_tokens": 8, "temperature": 0}, timeout=30)  # fmt: skip
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference(PROMPTS[3], 8).text
    finally:
        served.close()


def test_refused_request_fails_alone(slow, engine, reference):
    """A request the scheduler refuses when it joins fails with 400; the one beside it does not."""
    from specdecode.errors import InvalidArgument

    url, steps = slow
    scheduler = steps.worker.scheduler
    submit, refused = scheduler.submit, engine.encode("Lily and Ben")

    def picky_submit(prompt, *args, **kwargs):
        if list(prompt) == refused:
            raise InvalidArgument("temperature", "refused for the test")
        return submit(prompt, *args, **kwargs)

    scheduler.submit = picky_submit
    good = {"model": "m", "prompt": "The cat", "max_tokens": 30, "temperature": 0}
    t: dict = {}
    thread = threading.Thread(target=lambda: t.update(r=httpx.post(f"{url}/v1/completions", json=good, timeout=30)))
    thread.start()
    _wait_for(lambda: _health(url)["running"] == 1)
    r = httpx.post(f"{url}/v1/completions", json={**good, "prompt": "Lily and Ben"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert "refused for the test" in r.json()["error"]["message"]
    assert thread.is_alive()
    thread.join(30)
    assert t["r"].status_code == 200 and t["r"].json()["choices"][0]["text"] == reference("The cat", 30).text


def test_stop_tells_running_and_waiting_clients(engine):
    from specdecode.server import create_app

    app = create_app(engine, model_name="m", max_num_seqs=1 + 1, max_batch_tokens=16)
    served = _Served(app)
    SlowSteps(app.state.server.worker, 0.01)
    url = served.url
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/completions", json=LONG, timeout=30))) for _ in range(3)]  # fmt: skip
    try:
        for t in threads:
            t.start()
        _wait_for(lambda: _health(url)["running"] == 2 and _health(url)["queue_length"] == 1)
        app.state.server.worker.stop()
        for t in threads:
            t.join(30)
    finally:
        served.close()
    assert len(answers) == 3
    assert all(a.status_code == 503 and a.json()["error"]["code"] == "unavailable" for a in answers)


# ---- methods the scheduler refuses: one at a time, and it says so ---------------------------------


@pytest.mark.parametrize("kind", ["hf-backend", "swift"])
def test_refused_method_falls_back_to_one_at_a_time(kind, chat_model, reference, caplog):
    from fastapi.testclient import TestClient

    from specdecode.server import create_app

    if kind == "hf-backend":
        eng = Engine.from_pretrained(chat_model, "vanilla", backend="hf", progress=False)
        words = "native backend"
    else:
        eng = Engine.from_pretrained(chat_model, "swift", progress=False)
        words = "'swift'"
    with caplog.at_level(logging.WARNING, logger="specdecode.server"):
        app = create_app(eng, model_name="m", max_num_seqs=8)
    assert any("one at a time" in r.getMessage() and words in r.getMessage() for r in caplog.records)
    with TestClient(app) as c:
        health = c.get("/health").json()
        assert health["batching"]["enabled"] is False and words in health["batching"]["reason"]
        assert c.get("/metrics").text.count("specdecode_batching 0") == 1
        r = c.post("/v1/completions", json={"model": "m", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == reference(PROMPTS[0], 12).text
        assert "batched" not in r.json()["speculative"]["method_stats"]


def test_bad_batch_settings_are_refused(engine):
    from specdecode.errors import InvalidArgument
    from specdecode.server import create_app

    for kwargs in ({"max_num_seqs": 0}, {"max_batch_tokens": 0}, {"max_num_seqs": True}):
        with pytest.raises(InvalidArgument):
            create_app(engine, **kwargs)


def test_serve_cli_refuses_bad_batch_options(stories_path):
    from typer.testing import CliRunner

    from specdecode.cli import app

    for args in (["--max-num-seqs", "0"], ["--max-batch-tokens", "0"]):
        result = CliRunner().invoke(app, ["serve", "--model", str(stories_path), *args, "--port", "1"])
        assert result.exit_code == 2, result.output
        assert args[0] in result.output
