"""TokenSkip's prompt and target formats (hemingkx/TokenSkip: get_llamafactory_input.py,
evaluation.py).

- The user message: ``INSTRUCTION + "\\n" + question``, then for a ratio gamma < 1
  ``<|eot_id|>gamma<|eot_id|>``: the paper's separator, the same for every model (Qwen too;
  for Qwen it is plain text, not a special token). gamma 1.0 adds nothing.
- The training target: ``CoT + "\\n\\nThe final answer is: $\\boxed{answer}$"`` + EOS, where CoT
  is the target's own output (compressed for gamma < 1).
- The chain of thought of an answer, whose tokens are counted: the output before
  ``"\\n\\nThe final answer is:"`` (all of it when the phrase is absent).

The user message goes through the model's chat template (with its default system prompt) when
it has one, else it is the plain text followed by a newline: training and evaluation build the
prompt with the same function, so they always agree.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import InvalidArgument

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SEPARATOR = "<|eot_id|>"
ANSWER_PREFIX = "\n\nThe final answer is:"
PAPER_RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5)


def check_ratio(value, argument: str = "ratio") -> float:
    """A ratio gamma in (0, 1] (a number or its text)."""
    try:
        gamma = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        gamma = math.nan
    if not (0.0 < gamma <= 1.0):
        raise InvalidArgument(argument, f"expected a compression ratio in (0, 1], such as 0.6; got {value!r}")
    return gamma


def parse_ratios(text: str | list, argument: str = "ratios") -> list[float]:
    """``"1.0,0.8,0.6"`` -> [1.0, 0.8, 0.6] (each checked; duplicates refused)."""
    items = text if isinstance(text, (list, tuple)) else [t for t in str(text).split(",") if t.strip()]
    if not items:
        raise InvalidArgument(argument, f"expected comma-separated ratios in (0, 1] such as 1.0,0.8,0.6; got {text!r}")
    out = [check_ratio(str(t).strip() if isinstance(t, str) else t, argument) for t in items]
    if len(set(out)) != len(out):
        raise InvalidArgument(argument, f"a ratio is repeated in {text!r}")
    return out


def format_ratio(gamma: float) -> str:
    """How gamma is written in the prompt: ``0.6``, ``0.75`` (Python's shortest repr)."""
    return repr(float(check_ratio(gamma)))


def read_suffix(suffix: str | None) -> str | None:
    """``--suffix TEXT|FILE``: the text of an existing file, else the text itself."""
    if suffix is None:
        return None
    if not isinstance(suffix, str) or not suffix.strip():
        raise InvalidArgument("suffix", "expected non-empty text or a text file")
    p = Path(suffix).expanduser()
    try:
        if len(suffix) < 4096 and p.is_file():
            return p.read_text(encoding="utf-8").strip()
    except OSError:
        pass
    return suffix.strip()


def format_user(question: str, ratio: float = 1.0, suffix: str | None = None) -> str:
    """The user message TokenSkip trains and answers on. ``suffix``: text appended to the
    question (after a newline), before the ratio."""
    if not isinstance(question, str) or not question.strip():
        raise InvalidArgument("question", "expected a non-empty string")
    gamma = check_ratio(ratio)
    text = f"{INSTRUCTION}\n{question.strip()}"
    if suffix:
        text += f"\n{suffix}"
    if gamma < 1.0:
        text += f"{SEPARATOR}{format_ratio(gamma)}{SEPARATOR}"
    return text


def tokenskip_request(tokenizer, question: str, ratio: float = 1.0, suffix: str | None = None, chat: bool | None = None):
    """What ``Engine.encode`` takes: chat messages when the model has a chat template (or
    ``chat`` says so), else the plain text followed by a newline."""
    user = format_user(question, ratio, suffix)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    return [{"role": "user", "content": user}] if chat else user + "\n"


def tokenskip_prompt(tokenizer, question: str, ratio: float = 1.0, suffix: str | None = None) -> list[int]:
    """The prompt's token ids, tokenized the way ``Engine.encode`` does (the chat template with
    its generation prompt, or the text with the tokenizer's special tokens)."""
    request = tokenskip_request(tokenizer, question, ratio, suffix)
    if isinstance(request, list):
        ids = tokenizer.apply_chat_template(request, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(request, add_special_tokens=True)["input_ids"]
    return [int(t) for t in ids]


def sft_output(cot: str, answer: str) -> str:
    """The training target (before EOS): the chain of thought, then the boxed answer."""
    return f"{cot}{ANSWER_PREFIX} $\\boxed{{{answer}}}$"


def split_cot(output: str) -> str:
    """The chain-of-thought part of an answer: the text before "\\n\\nThe final answer is:"."""
    return output.split(ANSWER_PREFIX)[0]
