"""Benchmark questions in Spec-Bench's ``question.jsonl`` format, and their six subtasks.

One JSON object per line: ``question_id`` (int), ``category`` (str), ``turns`` (list of user
messages, asked one after the other) and an optional ``reference``. Spec-Bench groups the
categories into six subtasks: MT-bench's eight categories form ``mt_bench``; every other
category is a subtask of its own name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from ..checks import integer

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SUBTASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
OVERALL = "overall"


def subtask_of(category: str) -> str:
    return "mt_bench" if category in MT_BENCH_CATEGORIES else category


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]
    reference: Any = field(default=None, compare=False)

    @property
    def subtask(self) -> str:
        return subtask_of(self.category)


def default_questions_path() -> Path:
    """The project's own small suite (a few questions per subtask), shipped with the package."""
    return Path(str(resources.files("specdecode") / "data" / "default_questions.jsonl"))


def _parse_line(line: str, where: str) -> Question:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidArgument("questions", f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise InvalidArgument("questions", f"{where}: expected a JSON object")
    qid, category, turns = row.get("question_id"), row.get("category"), row.get("turns")
    if isinstance(qid, bool) or not isinstance(qid, int):
        raise InvalidArgument("questions", f"{where}: 'question_id' must be an integer, got {qid!r}")
    if not isinstance(category, str) or subtask_of(category) not in SUBTASKS:
        known = ", ".join(MT_BENCH_CATEGORIES + SUBTASKS[1:])
        raise InvalidArgument("questions", f"{where}: 'category' must be one of {known}; got {category!r}")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise InvalidArgument("questions", f"{where}: 'turns' must be a non-empty list of non-empty strings")
    return Question(qid, category, tuple(turns), row.get("reference"))


def load_questions(path: str | Path) -> list[Question]:
    """Read a question file; errors name the file and the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidArgument("questions", f"no question file at {str(path)!r}")
    questions: list[Question] = []
    seen: dict[int, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            q = _parse_line(line, where)
            if q.question_id in seen:
                raise InvalidArgument(
                    "questions", f"{where}: question_id {q.question_id} already used on line {seen[q.question_id]}"
                )
            seen[q.question_id] = number
            questions.append(q)
    if not questions:
        raise InvalidArgument("questions", f"{str(path)!r} holds no questions")
    return questions


def parse_subtasks(text: str | None) -> list[str]:
    """``"qa,rag"`` -> ["qa", "rag"]; None or "all" -> all six, in Spec-Bench's order."""
    if text is None or text.strip() in ("", "all"):
        return list(SUBTASKS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        if name not in SUBTASKS:
            raise InvalidArgument("subtasks", f"unknown subtask {name!r}; expected some of {', '.join(SUBTASKS)}")
    return sorted(set(names), key=SUBTASKS.index)


def select(questions: list[Question], subtasks: list[str], per_subtask: int | None, offset: int = 0) -> list[Question]:
    """``per_subtask`` questions of each chosen subtask (all when None or 0), in file order,
    after skipping the first ``offset`` of each (to measure on questions not used before).

    MT-bench's share is taken round-robin over its categories so that a small subset still mixes
    writing, coding, math, ... rather than being all ``writing``.
    """
    if per_subtask is not None and (isinstance(per_subtask, bool) or per_subtask < 0):
        raise InvalidArgument("per_subtask", f"expected an integer >= 0 (0 = all), got {per_subtask!r}")
    integer("offset", offset, 0)
    chosen: set[int] = set()
    for subtask in subtasks:
        members = [q for q in questions if q.subtask == subtask]
        if subtask == "mt_bench":
            by_category: dict[str, list[Question]] = {}
            for q in members:
                by_category.setdefault(q.category, []).append(q)
            rounds = max((len(v) for v in by_category.values()), default=0)
            members = [v[i] for i in range(rounds) for v in by_category.values() if i < len(v)]
        members = members[offset:]
        if per_subtask:
            members = members[:per_subtask]
        chosen.update(q.question_id for q in members)
    picked = [q for q in questions if q.question_id in chosen]
    if not picked:
        where = f" after the first {offset} of each" if offset else ""
        raise InvalidArgument("subtasks", f"the question file has no questions in {', '.join(subtasks)}{where}")
    return picked
