"""GSM8K problems by path (``--data``), and the fixed subsets the steps run on.

A problem's ``index`` is its line number (0-based) in the file: every output row is keyed by it,
so a rerun skips what is done and two runs on the same subset compare row by row.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument
from .answers import gold_answer


@dataclass(frozen=True)
class Problem:
    index: int
    question: str
    answer: str  # the gold final answer (commas removed)


def load_gsm8k(path: str | Path, argument: str = "data") -> list[Problem]:
    """Every problem of a GSM8K jsonl file (``question``, ``answer`` ending in ``#### N``)."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise InvalidArgument(argument, f"expected a GSM8K .jsonl file (question, answer per line); {str(p)!r} is not a file")
    problems = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            where = f"{p.name} line {n + 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgument(argument, f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                raise InvalidArgument(argument, f"{where}: expected an object with string 'question' and 'answer'")
            try:
                gold = gold_answer(row["answer"])
            except ValueError as e:
                raise InvalidArgument(argument, f"{where}: {e}") from None
            problems.append(Problem(n, row["question"].strip(), gold))
    if not problems:
        raise InvalidArgument(argument, f"{str(p)!r} holds no problems")
    return problems


def select(problems: list[Problem], limit: int | None = None, *, seed: int | None = None, offset: int = 0) -> list[Problem]:
    """A fixed subset: problems ``offset .. offset+limit`` of the file (``seed`` None), or
    ``limit`` problems drawn with ``random.Random(seed).sample`` from all of them, kept in file
    order. ``limit`` None: all (from ``offset``)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidArgument("limit", f"expected a positive integer, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidArgument("offset", f"expected a non-negative integer, got {offset!r}")
    if seed is None:
        rows = problems[offset:]
        return rows if limit is None else rows[:limit]
    if offset:
        raise InvalidArgument("offset", "takes no value with a seeded sample (--seed)")
    if limit is None or limit >= len(problems):
        return list(problems)
    chosen = random.Random(seed).sample(range(len(problems)), limit)
    return [problems[i] for i in sorted(chosen)]
