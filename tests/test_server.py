"""`specdecode serve` against live servers on 127.0.0.1.

Two servers:
* ``server``: the real CLI (``python -m specdecode serve``) in a subprocess, method pld, with an
  API key, on a copy of stories260K that has a chat template. Answers are compared with a
  vanilla ``Engine.generate`` in this process (greedy speculative decoding is lossless, so
  they must be equal).
* ``slow``: ``create_app`` under uvicorn in a thread, over a wrapper of the engine whose pieces
  come slowly (and can be held or made to fail), with a queue of one: for disconnects, a full
  queue and failures in the middle of a generation, deterministically.
"""

from __future__ import annotations

import json
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
from .conftest import make_chat_model  # noqa: E402

torch.set_num_threads(1)  # the server subprocess gets one thread too: two cores in all

API_KEY = "test-key"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] == 'forbidden' %}{{ raise_exception('forbidden content') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPTS = ["Once upon a time", "The cat", "Tom had a red ball", "One day, a little bird", "Lily and Ben",
           "The sun was", "A big dog", "Mom said"]  # fmt: skip


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, stories_path) -> Path:
    """stories260K plus a chat template (it has none), named "tinychat"."""
    return make_chat_model(tmp_path_factory.mktemp("models") / "tinychat", stories_path, CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def reference(chat_model):
    """Greedy answers of plain decoding, memoized: {(prompt or messages json, max_tokens): result}."""
    engine = Engine.from_pretrained(chat_model, "vanilla", progress=False)
    cache: dict = {}

    def expected(prompt, max_tokens: int, **kwargs):
        key = (json.dumps(prompt), max_tokens, json.dumps(kwargs, sort_keys=True))
        if key not in cache:
            cache[key] = engine.generate(prompt, max_new_tokens=max_tokens, temperature=0.0, **kwargs)
        return cache[key]

    expected.engine = engine
    return expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {url} did not become healthy in {timeout}s")


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    """The real CLI in a subprocess; yields its base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    cmd = [sys.executable, "-m", "specdecode", "serve", "--model", str(chat_model), "--method", "pld",
           "--port", str(port), "--api-key", API_KEY, "--max-queue", "32", "--threads", "1",
           "--log-level", "warning"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
    except RuntimeError as e:
        proc.kill()
        pytest.fail(f"{e}\n{log.read_text()}")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def client(server):
    # No retries: a 429 or 5xx must show up as a failure, not be papered over.
    with openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=30) as c:
        yield c


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def _metrics(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    r = httpx.get(f"{url}/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---- the OpenAI client against the real CLI server ----------------------------------------------


def test_health_and_models(server, client):
    health = httpx.get(f"{server}/health", timeout=5).json()
    assert health["status"] == "ok" and health["model"] == "tinychat" and health["method"] == "pld"
    models = client.models.list()
    assert [m.id for m in models.data] == ["tinychat"]
    assert client.models.retrieve("tinychat").id == "tinychat"


def test_completion_equals_engine(client, reference):
    expected = reference(PROMPTS[0], 24)
    r = client.completions.create(model="tinychat", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.model == "tinychat"
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason == "length"
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.token_ids) == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    spec = r.model_extra["speculative"]
    assert spec["method"] == "pld"
    assert 1 <= spec["target_forwards"] <= 24
    assert spec["mean_accepted_tokens"] == pytest.approx(24 / spec["target_forwards"], rel=1e-3)


def test_completion_equals_cli_generate_json(client, chat_model):
    from typer.testing import CliRunner

    from specdecode.cli import app

    result = CliRunner().invoke(
        app, ["generate", "--json", "--model", str(chat_model), "--prompt", PROMPTS[2], "--max-new-tokens", "20"]
    )
    assert result.exit_code == 0, result.output
    cli = json.loads(result.stdout.strip().splitlines()[-1])
    r = client.completions.create(model="tinychat", prompt=PROMPTS[2], max_tokens=20, temperature=0)
    assert r.choices[0].text == cli["text"]
    assert r.usage.completion_tokens == len(cli["token_ids"])
    assert r.usage.prompt_tokens == cli["prompt_tokens"]


def test_prompt_as_token_ids(client, reference):
    ids = reference.engine.encode(PROMPTS[1])
    r = client.completions.create(model="tinychat", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == reference(PROMPTS[1], 8).text


def test_chat_equals_engine(client, reference):
    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A story about a cat"}]
    expected = reference(messages, 20)
    r = client.chat.completions.create(model="tinychat", messages=messages, max_tokens=20, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == 20
    assert r.model_extra["speculative"]["method"] == "pld"


def test_streamed_completion_joins_to_answer(client, reference):
    expected = reference(PROMPTS[3], 30)
    chunks = list(
        client.completions.create(
            model="tinychat", prompt=PROMPTS[3], max_tokens=30, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    *_, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 30
    assert last.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_chat_joins_to_answer(client, reference):
    messages = [{"role": "user", "content": "Tell me about a dog"}]
    expected = reference(messages, 25)
    stream = client.chat.completions.create(model="tinychat", messages=messages, max_tokens=25, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is None  # no include_usage: no usage chunk
    assert chunks[-1].model_extra["speculative"]["target_forwards"] >= 1


def test_raw_stream_ends_with_done(server):
    body = {"model": "tinychat", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=_auth(), timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_stop_and_seed(client, reference):
    expected = reference(PROMPTS[0], 30, stop=["Lily"])
    r = client.completions.create(model="tinychat", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=["Lily"])
    assert r.choices[0].text == expected.text and "Lily" not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    # Sampling with a seed is reproducible; without temperature it is OpenAI's default of 1.
    a, b = (client.completions.create(model="tinychat", prompt=PROMPTS[1], max_tokens=15, seed=7) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    assert a.usage.completion_tokens == 15


def test_concurrent_clients_get_their_own_answers(server, reference):
    """16 clients x 5 requests at once, mixing endpoints and streaming: each answer is the greedy
    answer for its own prompt, whole."""
    max_tokens = 16
    jobs = []
    for i in range(16):
        for j in range(5):
            prompt, kind = PROMPTS[(i + j) % len(PROMPTS)], (i + j * 3) % 4
            if kind >= 2:  # chat
                prompt = [{"role": "user", "content": prompt}]
            jobs.append((i, prompt, kind))
    expected = {json.dumps(p): reference(p, max_tokens).text for _, p, _ in jobs}  # before the threads

    def run_client(i: int) -> list[tuple[str, str]]:
        answers = []
        with openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
            for _, prompt, kind in (job for job in jobs if job[0] == i):
                args = dict(model="tinychat", max_tokens=max_tokens, temperature=0)
                if kind == 0:
                    text = c.completions.create(prompt=prompt, **args).choices[0].text
                elif kind == 1:
                    text = "".join(ch.choices[0].text for ch in c.completions.create(prompt=prompt, stream=True, **args))
                elif kind == 2:
                    text = c.chat.completions.create(messages=prompt, **args).choices[0].message.content
                else:
                    stream = c.chat.completions.create(messages=prompt, stream=True, **args)
                    text = "".join(ch.choices[0].delta.content or "" for ch in stream)
                answers.append((json.dumps(prompt), text))
        return answers

    before = _metrics(server)
    with ThreadPoolExecutor(16) as pool:
        results = [a for answers in pool.map(run_client, range(16)) for a in answers]
    assert len(results) == 80
    wrong = [(p, got, expected[p]) for p, got in results if got != expected[p]]
    assert not wrong, wrong[:3]
    after = _metrics(server)
    key = 'specdecode_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert after[key] - before.get(key, 0) == 40
    assert after["specdecode_generated_tokens_total"] - before["specdecode_generated_tokens_total"] == 80 * max_tokens


def test_metrics(server, client):
    client.completions.create(model="tinychat", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    m = _metrics(server)
    assert m['specdecode_info{model="tinychat",method="pld"}'] == 1
    assert m['specdecode_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert m["specdecode_generated_tokens_total"] >= 4
    assert m["specdecode_target_forwards_total"] >= 1
    assert m["specdecode_mean_accepted_tokens"] == pytest.approx(
        m["specdecode_generated_tokens_total"] / m["specdecode_target_forwards_total"]
    )
    assert m["specdecode_queue_length"] == 0
    for h in ("request_latency_seconds", "time_to_first_token_seconds", "queue_wait_seconds"):
        count = m[f"specdecode_{h}_count"]
        assert count >= 1 and m[f'specdecode_{h}_bucket{{le="+Inf"}}'] == count


# ---- bad requests -------------------------------------------------------------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": "tinychat", "prompt": "Once upon a time", "max_tokens": 2}
OK_CHAT = {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG = "Once upon a time " * 200  # ~800 tokens; the context holds 512

# (id, path, body (dict, or raw bytes), headers, status, param, code)
BAD = [
    ("no-key", C, OK, {}, 401, None, "invalid_api_key"),
    ("wrong-key", C, OK, {"Authorization": "Bearer nope"}, 401, None, "invalid_api_key"),
    ("not-bearer", C, OK, {"Authorization": API_KEY}, 401, None, "invalid_api_key"),
    ("malformed-json", C, b'{"model": "tinychat",', None, 400, None, "invalid_json"),
    ("empty-body", C, b"", None, 400, None, "invalid_json"),
    ("not-an-object", C, b"[1, 2]", None, 422, None, "invalid_type"),
    ("missing-model", C, {"prompt": "hi"}, None, 422, "model", "missing_field"),
    ("missing-prompt", C, {"model": "tinychat"}, None, 422, "prompt", "missing_field"),
    ("missing-messages", CHAT, {"model": "tinychat"}, None, 422, "messages", "missing_field"),
    ("prompt-wrong-type", C, {**OK, "prompt": 42}, None, 422, "prompt", "invalid_type"),
    ("max-tokens-string", C, {**OK, "max_tokens": "10"}, None, 422, "max_tokens", "invalid_type"),
    ("stream-string", C, {**OK, "stream": "yes"}, None, 422, "stream", "invalid_type"),
    ("message-no-role", CHAT, {**OK_CHAT, "messages": [{"content": "hi"}]}, None, 422, "messages", "missing_field"),
    ("messages-empty", CHAT, {**OK_CHAT, "messages": []}, None, 400, "messages", "invalid_value"),
    ("unknown-model", C, {**OK, "model": "gpt-4"}, None, 404, "model", "model_not_found"),
    ("unknown-model-chat", CHAT, {**OK_CHAT, "model": "gpt-4"}, None, 404, "model", "model_not_found"),
    ("max-tokens-zero", C, {**OK, "max_tokens": 0}, None, 400, "max_tokens", "invalid_value"),
    ("max-tokens-negative", CHAT, {**OK_CHAT, "max_tokens": -5}, None, 400, "max_tokens", "invalid_value"),
    ("max-tokens-beyond-context", C, {**OK, "max_tokens": 100000}, None, 400, "max_tokens", "invalid_value"),
    ("prompt-too-long", C, {**OK, "prompt": LONG}, None, 400, "prompt", "invalid_value"),
    ("messages-too-long", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": LONG}]}, None, 400, "messages", "invalid_value"),  # fmt: skip
    ("prompt-too-long-stream", C, {**OK, "prompt": LONG, "stream": True}, None, 400, "prompt", "invalid_value"),
    ("prompt-empty", C, {**OK, "prompt": ""}, None, 400, "prompt", "invalid_value"),
    ("token-id-outside-vocab", C, {**OK, "prompt": [1, 99999]}, None, 400, "prompt", "invalid_value"),
    ("temperature-high", C, {**OK, "temperature": 2.5}, None, 400, "temperature", "invalid_value"),
    ("temperature-negative", CHAT, {**OK_CHAT, "temperature": -1}, None, 400, "temperature", "invalid_value"),
    ("top-p-zero", C, {**OK, "top_p": 0}, None, 400, "top_p", "invalid_value"),
    ("top-p-high", CHAT, {**OK_CHAT, "top_p": 1.5}, None, 400, "top_p", "invalid_value"),
    ("n-2", C, {**OK, "n": 2}, None, 400, "n", "unsupported_value"),
    ("n-2-chat", CHAT, {**OK_CHAT, "n": 2}, None, 400, "n", "unsupported_value"),
    ("two-prompts", C, {**OK, "prompt": ["a", "b"]}, None, 400, "prompt", "unsupported_value"),
    ("empty-stop", C, {**OK, "stop": [""]}, None, 400, "stop", "invalid_value"),
    ("template-rejects-messages", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "forbidden"}]}, None, 400, "messages", "invalid_value"),  # fmt: skip
    ("seed-too-big", C, {**OK, "seed": 2**70}, None, 400, "seed", "invalid_value"),
    ("seed-not-int", C, {**OK, "seed": 1.5}, None, 422, "seed", "invalid_type"),
    ("logprobs", C, {**OK, "logprobs": 2}, None, 400, "logprobs", "unsupported_value"),
    ("stream-options-without-stream", C, {**OK, "stream_options": {"include_usage": True}}, None, 400, "stream_options", "invalid_value"),  # fmt: skip
]


@pytest.mark.parametrize("path,body,headers,status,param,code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request(server, path, body, headers, status, param, code):
    headers = _auth() if headers is None else headers
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}{path}", headers={"Content-Type": "application/json", **headers}, timeout=10, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/nope", 404), ("GET", "/v1/completions", 405),
                                                ("GET", "/v1/models/gpt-4", 404)])  # fmt: skip
def test_unknown_routes_and_models(server, method, path, status):
    r = httpx.request(method, f"{server}{path}", headers=_auth(), timeout=5)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["code"]


def test_bad_requests_leave_answers_intact(client, reference):
    r = client.completions.create(model="tinychat", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert r.choices[0].text == reference(PROMPTS[0], 10).text


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tinychat", prompt="hi", max_tokens=2, n=2)
    assert e.value.body["param"] == "n"
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- the slow in-process server: disconnects, a full queue, failures -------------------------------


class SlowEngine:
    """The real engine, but each piece takes ``delay`` seconds, waits for ``gate``, and a
    generation can be made to fail after its first piece (``fail_next``)."""

    def __init__(self, engine: Engine, delay: float):
        self._engine, self.delay = engine, delay
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False
        self.streams: list[SlowStream] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream(self, *args, **kwargs):
        s = SlowStream(self._engine.stream(*args, **kwargs), self, fail=self.fail_next)
        self.fail_next = False
        self.streams.append(s)
        return s


class SlowStream:
    def __init__(self, inner, owner: SlowEngine, fail: bool):
        self.inner, self.owner, self.fail = inner, owner, fail
        self.pieces = 0
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        self.owner.gate.wait()
        time.sleep(self.owner.delay)
        if self.fail and self.pieces == 1:
            raise RuntimeError("simulated failure in the middle of a generation")
        self.pieces += 1
        return next(self.inner)

    def close(self) -> None:
        self.closed = True
        self.inner.close()

    @property
    def result(self):
        return self.inner.result


@pytest.fixture(scope="module")
def slow(stories_path):
    """(base url, SlowEngine) of an in-thread server with a queue of one and no API key."""
    from specdecode.server import create_app

    engine = SlowEngine(Engine.from_pretrained(stories_path, "vanilla", progress=False), delay=0.02)
    app = create_app(engine, model_name="slow", max_queue=1, max_num_seqs=1)  # one at a time: the wrapper's stream
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-thread server did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(10)


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


LONG_RUN = {"model": "slow", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}  # 8 s undisturbed


def test_disconnect_mid_stream_frees_worker(slow, reference):
    url, engine = slow
    before = _metrics(url)["specdecode_requests_cancelled_total"]
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", f"{url}/v1/completions", json={**LONG_RUN, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            assert next(line for line in lines if line).startswith("data: ")
    # the client (and its connection) is gone: the worker must stop that generation ...
    stream = engine.streams[-1]
    _wait_for(lambda: stream.closed and _health(url)["running"] == 0, timeout=3)
    assert stream.result is None and stream.pieces < 100
    assert _metrics(url)["specdecode_requests_cancelled_total"] == before + 1
    # ... and serve the next request at once.
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={**LONG_RUN, "max_tokens": 5}, timeout=10)
    assert r.status_code == 200 and time.monotonic() - t0 < 3
    assert r.json()["choices"][0]["text"] == reference("Once upon a time", 5).text


def test_disconnect_while_waiting_for_plain_answer(slow):
    url, engine = slow
    before = _metrics(url)["specdecode_requests_cancelled_total"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{url}/v1/completions", json=LONG_RUN, timeout=httpx.Timeout(10, read=0.5))
    stream = engine.streams[-1]
    _wait_for(lambda: stream.closed and _health(url)["running"] == 0, timeout=3)
    assert stream.result is None
    assert _metrics(url)["specdecode_requests_cancelled_total"] == before + 1


def test_full_queue_answers_429(slow, reference):
    url, engine = slow
    body = {"model": "slow", "prompt": "The cat", "max_tokens": 4, "temperature": 0}
    answers: dict[str, httpx.Response] = {}

    def send(name: str) -> None:
        answers[name] = httpx.post(f"{url}/v1/completions", json=body, timeout=30)

    engine.gate.clear()  # the worker will hold its first request at the first piece
    try:
        running = threading.Thread(target=send, args=("running",))
        running.start()
        _wait_for(lambda: _health(url)["running"] == 1)
        waiting = threading.Thread(target=send, args=("waiting",))
        waiting.start()
        _wait_for(lambda: _health(url)["queue_length"] == 1)
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=5)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "queue_full" and "--max-queue" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        assert _metrics(url)["specdecode_queue_length"] == 1
    finally:
        engine.gate.set()
    running.join(30)
    waiting.join(30)
    for name in ("running", "waiting"):
        assert answers[name].status_code == 200
        assert answers[name].json()["choices"][0]["text"] == reference("The cat", 4).text


def test_failure_mid_generation_is_contained(slow, reference):
    url, engine = slow
    body = {"model": "slow", "prompt": "The cat", "max_tokens": 6, "temperature": 0}
    engine.fail_next = True
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "simulated failure" in r.json()["error"]["message"]
    engine.fail_next = True
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=10) as s:
        events = [line[6:] for line in s.iter_lines() if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    # the worker lives on and answers correctly
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference("The cat", 6).text


# ---- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
        (["--method", "nosuchmethod"], "method"),
        (["--method", "pld", "--option", "no_such_option=1"], "no_such_option"),
        (["--max-queue", "0"], "max-queue"),
    ],
)
def test_serve_cli_refuses_bad_arguments(stories_path, args, message):
    """Bad arguments end the command with a message before any port is opened."""
    from typer.testing import CliRunner

    from specdecode.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(stories_path), *args, "--port", "1"])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_cli_works_without_the_serve_extra():
    """Without fastapi/uvicorn the other commands still work and `serve` says what to install."""
    code = """
import sys
class Block:  # as if the serve extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('fastapi', 'uvicorn', 'starlette'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from typer.testing import CliRunner
from specdecode.cli import app
assert CliRunner().invoke(app, ["models"]).exit_code == 0
r = CliRunner().invoke(app, ["serve"])
assert r.exit_code == 2 and "specdecode[serve]" in r.output, r.output
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_stopped_worker_answers_503(reference):
    """Once the worker is stopped (the server is shutting down), requests get 503, not a hang."""
    from fastapi.testclient import TestClient

    from specdecode.server import create_app

    with TestClient(create_app(reference.engine, model_name="m")) as c:
        assert c.get("/health").status_code == 200
        c.app.state.server.worker.stop()
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503
        assert r.json()["error"] == {"message": "the server is shutting down", "type": "server_error",
                                     "param": None, "code": "unavailable"}  # fmt: skip
        assert c.get("/health").status_code == 503


def test_cli_server_runs_the_model_on_the_main_thread_and_stops_on_sigterm(chat_model, tmp_path):
    """`specdecode serve` drives the generation worker from the main thread (torch's OpenMP ops
    ran ~2x slower from a second thread, see Worker.driven_by_caller) and uvicorn from another;
    SIGTERM still shuts both down cleanly, after answering."""
    port = _free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "specdecode", "serve", "--model", str(chat_model), "--method", "vanilla",
           "--port", str(port), "--threads", "1", "--log-level", "warning"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["worker_thread"] == "MainThread"
        r = httpx.post(f"{url}/v1/completions", json={"model": "tinychat", "prompt": "Once", "max_tokens": 8}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
