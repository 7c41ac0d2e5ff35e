"""Who writes new candidate suffixes each round, and what they are asked.

The paper had GPT-4o write them. Here the default writer is the target itself, sampled (a small
model writes weaker candidates: say so when reporting), or any OpenAI-compatible chat endpoint
(``--writer-url``): a ``specdecode serve`` of a larger model, vLLM, or a hosted API.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from ..errors import InvalidArgument
from .candidates import ANGLES, MAX_WORDS

MIN_REPLY_TOKENS = 64  # room for a few suffixes at least

SYSTEM = (
    "You write short instructions that are appended to a math word problem so that a language model "
    "solves it correctly while writing as few tokens as possible."
)


def _line(c: dict) -> str:
    return f'"{c["text"]}" (accuracy {100 * c["accuracy"]:.0f}%, {c["mean_cot_tokens"]:.0f} tokens per answer)'


def writer_messages(base: dict, ranked: list[dict], n: int) -> list[dict]:
    """The request for ``n`` new suffixes: the base prompt's scores, the best so far (``ranked``:
    dicts with text, accuracy, mean_cot_tokens, kept), and the persuasion angles to try."""
    angles = "\n".join(f"- {a}: {what}" for a, what in ANGLES.items())
    shown = "\n".join(f"{i}. {_line(c)}" + ("" if c.get("kept") else f" - {c.get('screened_out') or 'accuracy dropped'}, avoid")
                      for i, c in enumerate(ranked, 1))  # fmt: skip
    user = (
        f"Without a suffix the model gets {100 * base['accuracy']:.0f}% of the problems right and writes "
        f"{base['mean_cot_tokens']:.0f} tokens per answer.\n\n"
        f"Suffixes tried so far, best first:\n{shown or '(none yet)'}\n\n"
        f"Persuasion angles:\n{angles}\n\n"
        f"Write {n} new suffixes, different from those above, that should make the answers shorter still "
        f"without losing accuracy. Each at most {MAX_WORDS // 2} words. One per line, formatted as "
        "`angle: suffix`, and nothing else."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


class TargetWriter:
    """The target model writes the candidates (sampled through our own engine: exact, so this
    is the model's own distribution)."""

    def __init__(self, engine, *, temperature: float = 0.8, max_new_tokens: int = 400, seed: int = 0):
        self.engine, self.temperature, self.max_new_tokens, self.seed = engine, temperature, max_new_tokens, seed
        self.source = "target"

    def __call__(self, messages: list[dict], round: int) -> str:
        tok = self.engine.tokenizer
        if getattr(tok, "chat_template", None):
            prompt = messages
        else:  # a model without a chat template reads the request as plain text
            prompt = "\n\n".join(m["content"] for m in messages) + "\n"
        context = self.engine.target.max_length
        try:
            ids = self.engine.encode(prompt)
        except InvalidArgument as e:
            raise InvalidArgument("writer", f"the target cannot read the writer's request ({e.message}): "
                                  "name a larger model with --writer-url, or search the starting set only (--rounds 0)") from None  # fmt: skip
        room = context - len(ids)
        if room < min(MIN_REPLY_TOKENS, self.max_new_tokens):
            raise InvalidArgument("writer", f"the writer's request takes {len(ids)} of the target's {context} tokens of "
                                  f"context, leaving {room} for the reply: name a larger model with --writer-url, "
                                  "or search the starting set only (--rounds 0)")  # fmt: skip
        r = self.engine.generate(ids, max_new_tokens=min(room, self.max_new_tokens), temperature=self.temperature, seed=self.seed + round)
        return r.text


class EndpointWriter:
    """Any OpenAI-compatible ``/v1/chat/completions`` writes the candidates."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 temperature: float = 0.8, max_tokens: int = 600, timeout: float = 300.0):  # fmt: skip
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InvalidArgument("writer_url", f"expected an http(s) URL such as http://localhost:8000/v1, got {url!r}")
        url = url.rstrip("/")
        self.base = url if url.endswith("/v1") else url + "/v1"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.temperature, self.max_tokens, self.timeout = temperature, max_tokens, timeout
        self.model = model or self._first_model()
        self.source = f"{self.model} at {self.base}"

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            raise InvalidArgument("writer_url", f"{self.base + path} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise InvalidArgument("writer_url", f"cannot reach {self.base + path}: {getattr(e, 'reason', e)}") from None

    def _first_model(self) -> str:
        data = self._request("/models").get("data") or []
        if not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise InvalidArgument("writer_model", f"{self.base}/models lists no model: name one with --writer-model")
        return data[0]["id"]

    def __call__(self, messages: list[dict], round: int) -> str:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens}
        reply = self._request("/chat/completions", body)
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise InvalidArgument("writer_url", f"{self.base}/chat/completions answered without choices[0].message.content") from None
