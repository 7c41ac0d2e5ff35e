"""The server against bad and hostile requests (issue 12, "server hardening").

One in-thread uvicorn server (real sockets: bodies cut short, chunked uploads, oversized
``Content-Length``) over stories260K with a chat template, a small ``--max-body-bytes`` and an
engine whose generation can be held (``gate``), so "the worker is busy" is deterministic.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from specdecode import Engine  # noqa: E402
from .conftest import make_chat_model

torch.set_num_threads(1)

MAX_BODY = 4096
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": "m", "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0}
OK_CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
LONG = "Once upon a time " * 200  # ~800 tokens, ~3.4 kB: under the body limit, over the 512-token context


class HeldEngine:
    """The real engine; its generations wait for ``gate``, and it notes the threads that
    tokenize text prompts."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.text_encode_threads: list[str] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def encode(self, prompt, **kwargs):
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            self.text_encode_threads.append(threading.current_thread().name)
        return self._engine.encode(prompt, **kwargs)

    def stream(self, *args, **kwargs):
        inner = self._engine.stream(*args, **kwargs)
        gate = self.gate

        class Held:
            def __iter__(self):
                return self

            def __next__(self):
                gate.wait()
                return next(inner)

            def close(self):
                inner.close()

            @property
            def result(self):
                return inner.result

        return Held()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, stories_path) -> Path:
    return make_chat_model(tmp_path_factory.mktemp("models") / "tinychat", stories_path, CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def live(chat_model):
    """(base url, HeldEngine) of an in-thread uvicorn server: max_body_bytes=4096, queue of 4."""
    from specdecode.server import create_app

    engine = HeldEngine(Engine.from_pretrained(chat_model, "vanilla", progress=False))
    app = create_app(engine, model_name="m", max_queue=4, max_body_bytes=MAX_BODY, max_num_seqs=1)  # the wrapper's stream
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-thread server did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", port, engine
    engine.gate.set()
    srv.should_exit = True
    thread.join(10)


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _count(metrics: dict[str, float], endpoint: str, status: int) -> float:
    return metrics.get(f'specdecode_requests_total{{endpoint="{endpoint}",status="{status}"}}', 0.0)


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _error(r: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of ``r``, checked: the status, the four keys, a message, a code."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], str) and error["code"], error
    return error


def _raw(port: int, data: bytes, *, read: bool = True, timeout: float = 5.0) -> bytes:
    """Send raw bytes over a fresh connection; return what comes back until the server closes
    the connection or ``timeout`` passes (b"" when ``read`` is false: we just hang up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        answer = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer:
                head, _, body = answer.partition(b"\r\n\r\n")
                length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                if length and len(body) >= int(length[0].split(b":")[1]):
                    break
        return answer


def _status_and_json(answer: bytes) -> tuple[int, dict]:
    assert answer, "no answer: the server waited for the rest of the body"
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def _post_head(path: str, extra: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{extra}\r\n".encode()


# ---- a client hanging up while sending its body ---------------------------------------------------


def test_hang_up_mid_body_counts_as_disconnect(live, caplog):
    url, port, _ = live
    before = _metrics(url)
    caplog.set_level(logging.ERROR)
    _raw(port, _post_head(C, "Content-Length: 1000\r\n") + b'{"model": "m", "prompt": "Once', read=False)
    _wait_for(lambda: _count(_metrics(url), C, 499) == _count(before, C, 499) + 1, timeout=5)
    after = _metrics(url)
    assert _count(after, C, 500) == _count(before, C, 500)
    assert not [r for r in caplog.records if r.name.startswith(("specdecode", "uvicorn"))], caplog.text
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"


# ---- the body-size limit -------------------------------------------------------------------------


def test_body_over_the_limit_is_413(live):
    url, _, _ = live
    r = httpx.post(f"{url}{C}", json={**OK, "prompt": "x" * (MAX_BODY + 10)}, timeout=10)
    error = _error(r, 413)
    assert error["code"] == "request_too_large" and "--max-body-bytes" in error["message"]
    assert str(MAX_BODY) in error["message"]
    assert _count(_metrics(url), C, 413) >= 1
    # just under the limit is served
    r = httpx.post(f"{url}{C}", json={**OK, "prompt": "Once upon a time", "user": "u" * (MAX_BODY - 200)}, timeout=10)
    assert r.status_code == 200, r.text


def test_declared_length_over_the_limit_is_refused_before_reading(live):
    """A 50 MB Content-Length is refused at once: the server does not wait for the body."""
    _, port, _ = live
    answer = _raw(port, _post_head(C, "Content-Length: 50000000\r\n") + b'{"model": "m", ')
    status, body = _status_and_json(answer)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert "50000000" in body["error"]["message"]


def test_chunked_body_over_the_limit_is_refused_while_streaming_in(live):
    """Without Content-Length the bytes are counted as they come: 413 once past the limit,
    without waiting for the end of the upload (which never comes here)."""
    _, port, _ = live
    chunk = b"x" * 1000
    data = _post_head(CHAT, "Transfer-Encoding: chunked\r\n")
    data += b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY // 1000 + 2))
    status, body = _status_and_json(_raw(port, data))  # no terminating chunk is sent
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_chunked_body_under_the_limit_is_served(live):
    _, port, _ = live
    payload = json.dumps(OK).encode()
    data = _post_head(C, "Transfer-Encoding: chunked\r\nConnection: close\r\n")
    data += b"%x\r\n%s\r\n" % (len(payload[:10]), payload[:10])
    data += b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload[10:]), payload[10:])
    status, body = _status_and_json(_raw(port, data, timeout=10))
    assert status == 200 and body["object"] == "text_completion"


def test_max_body_bytes_is_checked():
    from specdecode.errors import InvalidArgument
    from specdecode.server import create_app

    with pytest.raises(InvalidArgument, match="max_body_bytes"):
        create_app(object(), max_body_bytes=0)


def test_serve_cli_refuses_a_bad_max_body_bytes(stories_path):
    from typer.testing import CliRunner

    from specdecode.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(stories_path), "--max-body-bytes", "0", "--port", "1"])
    assert result.exit_code == 2 and "Invalid value for '--max-body-bytes'" in result.output, result.output


# ---- prompts are tokenized and checked off the worker thread ---------------------------------------


def test_prompt_checked_while_the_worker_is_busy(live):
    """A prompt too long for the context is refused at once while the worker is held by
    another generation: tokenizing and checking it does not wait for (or stall) the worker."""
    url, _, engine = live
    answers: dict[str, httpx.Response] = {}

    def send() -> None:
        answers["held"] = httpx.post(f"{url}{C}", json={**OK, "max_tokens": 3}, timeout=30)

    engine.gate.clear()
    try:
        held = threading.Thread(target=send)
        held.start()
        _wait_for(lambda: httpx.get(f"{url}/health", timeout=5).json()["running"] == 1)
        t0 = time.monotonic()
        for path, body, param in [(C, {**OK, "prompt": LONG}, "prompt"),
                                  (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": LONG}]}, "messages"),
                                  (C, {**OK, "max_tokens": 100000}, "max_tokens")]:  # fmt: skip
            r = httpx.post(f"{url}{path}", json=body, timeout=5)
            error = _error(r, 400)
            assert error["param"] == param and error["code"] == "invalid_value"
        assert time.monotonic() - t0 < 5
        assert httpx.get(f"{url}/health", timeout=5).json()["running"] == 1  # still held
    finally:
        engine.gate.set()
    held.join(30)
    assert answers["held"].status_code == 200


def test_text_prompts_are_tokenized_off_the_worker_thread(live):
    url, _, engine = live
    engine.text_encode_threads.clear()
    assert httpx.post(f"{url}{C}", json=OK, timeout=10).status_code == 200
    assert httpx.post(f"{url}{CHAT}", json=OK_CHAT, timeout=10).status_code == 200
    assert len(engine.text_encode_threads) == 2, engine.text_encode_threads
    assert "specdecode-worker" not in engine.text_encode_threads


# ---- requests OpenAI refuses -----------------------------------------------------------------------

SURROGATE_PROMPT = b'{"model": "m", "max_tokens": 2, "prompt": "bad \\ud800 text"}'
SURROGATE_CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "a \\udc00"}]}'

# (id, path, body (dict, or raw bytes), status, param, code, words the message must hold)
REFUSED = [
    ("unknown-role", CHAT, {**OK_CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", "invalid_value", ["messages.0.role", "wizard", "user"]),  # fmt: skip
    ("user-content-null", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": None}]}, 400, "messages", "invalid_value", ["messages.0", "content"]),  # fmt: skip
    ("system-content-missing", CHAT, {**OK_CHAT, "messages": [{"role": "system"}, {"role": "user", "content": "hi"}]}, 400, "messages", "invalid_value", ["messages.0", "content"]),  # fmt: skip
    ("unknown-field", C, {**OK, "foo": 1}, 400, "foo", "unknown_parameter", ["foo"]),
    ("unknown-field-chat", CHAT, {**OK_CHAT, "frobnicate": True}, 400, "frobnicate", "unknown_parameter", ["frobnicate"]),
    ("unknown-field-in-message", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "hi", "foo": 1}]}, 400, "messages", "unknown_parameter", ["messages.0.foo"]),  # fmt: skip
    ("unknown-field-in-stream-options", C, {**OK, "stream": True, "stream_options": {"include_usage": True, "x": 1}}, 400, "stream_options", "unknown_parameter", ["stream_options.x"]),  # fmt: skip
    ("unknown-field-in-text-part", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": 1}]}]}, 400, "messages", "unknown_parameter", ["messages.0.content.0.x"]),  # fmt: skip
    ("known-openai-field-unsupported", CHAT, {**OK_CHAT, "tool_choice": "auto"}, 400, "tool_choice", "unsupported_value", ["tool_choice", "not supported"]),  # fmt: skip
    ("unsupported-field-set", C, {**OK, "parallel_tool_calls": True}, 400, "parallel_tool_calls", "unsupported_value", ["parallel_tool_calls"]),  # fmt: skip
    ("message-tool-calls", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "user", "content": "go on"}]}, 400, "messages", "unsupported_value", ["messages.1", "tool_calls"]),  # fmt: skip
    ("misspelt-parameter", C, {**OK, "max_token": 3}, 400, "max_token", "unknown_parameter", ["max_token", "max_tokens"]),  # fmt: skip
    ("response-format-json", CHAT, {**OK_CHAT, "response_format": {"type": "json_object"}}, 400, "response_format", "unsupported_value", ["response_format", "json_object"]),  # fmt: skip
    ("response-format-schema", C, {**OK, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, "response_format", "unsupported_value", ["response_format"]),  # fmt: skip
    ("stop-five-strings", C, {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value", ["stop", "4", "5"]),  # fmt: skip
    ("stop-thousands", CHAT, {**OK_CHAT, "stop": [f"s{i}" for i in range(300)]}, 400, "stop", "invalid_value", ["stop", "300"]),  # fmt: skip
    ("stop-huge-string", C, {**OK, "stop": "x" * 3000}, 400, "stop", "invalid_value", ["stop", "3000"]),
    ("stop-huge-in-list", C, {**OK, "stop": ["ok", "y" * 3000]}, 400, "stop", "invalid_value", ["stop", "3000"]),
    ("stream-options-without-stream", C, {**OK, "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value", ["stream"]),  # fmt: skip
    ("lone-surrogate-prompt", C, SURROGATE_PROMPT, 400, "prompt", "invalid_value", ["prompt", "surrogate"]),
    ("lone-surrogate-message", CHAT, SURROGATE_CHAT, 400, "messages", "invalid_value", ["messages.0.content", "surrogate"]),  # fmt: skip
]


@pytest.mark.parametrize("path,body,status,param,code,words", [x[1:] for x in REFUSED], ids=[x[0] for x in REFUSED])
def test_refused_like_openai(live, path, body, status, param, code, words):
    url, _, _ = live
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}  # fmt: skip
    error = _error(httpx.post(f"{url}{path}", timeout=10, **kwargs), status)
    assert (error["param"], error["code"]) == (param, code), error
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert error["type"] == "invalid_request_error"


ACCEPTED = [
    ("assistant-content-null", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "go on"}]}),  # fmt: skip
    ("developer-role", CHAT, {**OK_CHAT, "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]}),  # fmt: skip
    ("response-format-text", CHAT, {**OK_CHAT, "response_format": {"type": "text"}}),
    ("unsupported-params-null", CHAT, {**OK_CHAT, "tool_choice": None, "parallel_tool_calls": None, "metadata": {}, "store": False}),  # fmt: skip
    ("tool-choice-none", CHAT, {**OK_CHAT, "tool_choice": "none", "tools": []}),
    ("response-message-sent-back", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello", "refusal": None, "tool_calls": None, "function_call": None, "audio": None}, {"role": "user", "content": "go on"}]}),  # fmt: skip
    ("four-stop-strings", C, {**OK, "stop": ["a1", "b2", "c3", "d4"]}),
    ("valid-surrogate-pair", C, {**OK, "prompt": "Once upon a time \U0001f600"}),
    ("user-field", C, {**OK, "user": "someone"}),
]


@pytest.mark.parametrize("path,body", [x[1:] for x in ACCEPTED], ids=[x[0] for x in ACCEPTED])
def test_accepted(live, path, body):
    url, _, _ = live
    r = httpx.post(f"{url}{path}", json=body, timeout=10)
    assert r.status_code == 200, r.text


# ---- every error carries a code ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path,status,code",
    [("GET", C, 405, "method_not_allowed"), ("PUT", CHAT, 405, "method_not_allowed"), ("GET", "/v1/nope", 404, "not_found"),
     ("POST", "/health", 405, "method_not_allowed")],
)  # fmt: skip
def test_route_errors_have_a_code(live, method, path, status, code):
    url, _, _ = live
    error = _error(httpx.request(method, f"{url}{path}", timeout=5), status)
    assert error["code"] == code


def test_server_lives_on(live):
    url, _, _ = live
    assert httpx.get(f"{url}/health", timeout=5).json() == {**httpx.get(f"{url}/health", timeout=5).json(), "status": "ok", "running": 0}  # fmt: skip
    assert httpx.post(f"{url}{C}", json=OK, timeout=10).status_code == 200
    assert _count(_metrics(url), C, 500) == 0
