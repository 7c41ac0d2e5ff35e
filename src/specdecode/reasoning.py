"""Reasoning prompts: what ``generate`` and ``serve`` write into a request so that the model
reasons in fewer tokens.

- ``cot_ratio`` (TokenSkip, docs/tokenskip.md): the last user message becomes TokenSkip's user
  text with the ratio gamma, as a TokenSkip adapter was trained.
- ``reasoning_suffix`` (Whisper, docs/whisper.md): a searched suffix appended to the last user
  message after a newline (to a plain-text prompt: appended to the text).

Both: ``INSTRUCTION\\nquestion\\nsuffix<|eot_id|>gamma<|eot_id|>`` (``format_user``), the very
prompt ``tokenskip eval --suffix`` scores. Token-id prompts are left as they are (there is no
text to add to). ``added`` says what was written, for a response's ``usage``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidArgument
from .tokenskip.prompts import check_ratio, format_user, read_suffix

MAX_SUFFIX_CHARS = 2000


def check_suffix(text, argument: str = "reasoning_suffix") -> str | None:
    """A request's suffix: text (never a file: a client must not read the server's files);
    empty means none."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise InvalidArgument(argument, f"expected text, got {type(text).__name__}")
    if len(text) > MAX_SUFFIX_CHARS:
        raise InvalidArgument(argument, f"expected at most {MAX_SUFFIX_CHARS} characters, got {len(text)}")
    return text.strip() or None


@dataclass(frozen=True)
class ReasoningPrompt:
    cot_ratio: float | None = None
    suffix: str | None = None

    @classmethod
    def from_options(cls, options: dict) -> tuple["ReasoningPrompt", dict]:
        """Split ``-o`` options: (the reasoning prompt, the method's own options). The suffix
        option takes text or a text file (``best_suffix.txt`` of a Whisper search)."""
        rest = dict(options)
        ratio = rest.pop("cot_ratio", None)
        suffix = rest.pop("reasoning_suffix", None)
        if suffix is not None:
            suffix = check_suffix(read_suffix(str(suffix)) if str(suffix).strip() else "")
        return cls(None if ratio is None else check_ratio(ratio, "cot_ratio"), suffix), rest

    def __bool__(self) -> bool:
        return self.cot_ratio is not None or self.suffix is not None

    def added(self) -> dict:
        out = {}
        if self.cot_ratio is not None:
            out["cot_ratio"] = self.cot_ratio
        if self.suffix is not None:
            out["reasoning_suffix"] = self.suffix
        return out

    def _user(self, text: str) -> str:
        if self.cot_ratio is not None:
            return format_user(text, self.cot_ratio, self.suffix)
        return f"{text}\n{self.suffix}" if self.suffix else text

    def apply(self, request):
        """(the request with the reasoning prompt written in, what was added). Chat messages
        get their last user message rewritten (a copy); text becomes the user text (and, with a
        ratio, a newline: the format a model without a chat template is trained on)."""
        if not self:
            return request, {}
        if isinstance(request, str):
            return self._user(request) + ("\n" if self.cot_ratio is not None else ""), self.added()
        if isinstance(request, list) and request and all(isinstance(m, dict) for m in request):
            out = [dict(m) for m in request]
            for m in reversed(out):
                if m.get("role") == "user" and isinstance(m.get("content"), str):
                    m["content"] = self._user(m["content"])
                    return out, self.added()
        return request, {}
