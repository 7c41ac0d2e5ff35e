"""Answers: the gold answer of a GSM8K problem, the model's answer from its output, and whether
they agree.

Extraction follows TokenSkip's evaluation (its ``extract_answer``, itself DeepSeek-Math's): the
last ``\\boxed{...}`` if there is one (braces matched), else what follows the last "the answer
is", else the last number in the text. The extracted string is then normalised the way GSM8K
needs (commas, dollar signs, units in ``\\text{}``, a trailing period) and compared numerically
(|a - b| < 1e-3), else as strings.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d*\.?\d+")


def _boxed(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` (nested braces matched; an unclosed one is skipped)."""
    out = []
    for piece in text.split("boxed{")[1:]:
        depth = 0
        for i, ch in enumerate(piece):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth < 0:
                    out.append(piece[:i])
                    break
    return out


def _normalise(answer: str) -> str:
    s = answer.strip().split("\n")[0].strip()
    s = s.lstrip(":").strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:mbox|mathrm|textbf)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", r"\1/\2", s)
    for junk in ("\\$", "$", "\\%", "%", "\\!", "\\,", "\\ ", "^\\circ", "^{\\circ}"):
        s = s.replace(junk, "")
    s = s.replace(",", "").strip().rstrip(".").rstrip("/").strip()
    if re.fullmatch(r"-?\d*\.?\d+", s):
        return s
    if re.fullmatch(r"-?\d+/\d+", s):
        return s
    numbers = _NUMBER.findall(s)
    if len(numbers) == 1:  # "18 dollars", "x = 18"
        return numbers[0]
    return s


def extract_answer(output: str) -> str:
    """The model's final answer in ``output`` ("" when there is none)."""
    if not isinstance(output, str):
        raise TypeError(f"output: expected a string, got {type(output).__name__}")
    if "boxed{" in output:
        found = _boxed(output)
        if found:
            return _normalise(found[-1])
    if "he answer is" in output:
        return _normalise(output.split("he answer is")[-1])
    numbers = _NUMBER.findall(output.replace(",", ""))
    return numbers[-1] if numbers else ""


def gold_answer(solution: str) -> str:
    """GSM8K's reference answer: what follows ``#### `` in the worked solution, commas removed."""
    if "####" not in solution:
        raise ValueError("a GSM8K solution ends with '#### <answer>'; this one has no '####'")
    return solution.split("####")[-1].strip().replace(",", "")


def _as_number(s: str) -> float | None:
    try:
        if re.fullmatch(r"-?\d+/\d+", s):
            a, b = s.split("/")
            return int(a) / int(b) if int(b) else None
        return float(s)
    except ValueError:
        return None


def is_correct(prediction: str, gold: str, tolerance: float = 1e-3) -> bool:
    """Numerically equal within ``tolerance``, else equal as strings (both normalised)."""
    if not prediction:
        return False
    p, g = _normalise(prediction), _normalise(gold)
    pn, gn = _as_number(p), _as_number(g)
    if pn is not None and gn is not None:
        return abs(pn - gn) < tolerance
    return p == g
