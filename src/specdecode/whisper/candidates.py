"""Candidate suffixes: the starting set and the parser for what a writer LLM returns.

The paper's search asks an LLM for suffixes from several persuasion angles; the starting set
below covers the same angles (two or three each, appeals and concrete budgets) and was written
for this project. A candidate is identified by its
text (normalised: case and spacing ignored), so the same suffix written twice is scored once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass

from ..errors import InvalidArgument

ANGLES = {
    "instruction": "say plainly what to write and what to leave out",
    "evidence": "cite facts or experience showing that short solutions are as accurate",
    "role-play": "give the model a persona that writes tersely",
    "emotion": "appeal to the reader's feelings or to the model's confidence",
    "consequences": "say what a long answer costs or what a short one earns",
}

STARTING_SET: tuple[tuple[str, str], ...] = (
    ("instruction", "Be concise: write only the calculations you need, one short line each, then the boxed answer."),
    ("instruction", "Do not restate the problem or explain the obvious; give just the key equations and \\boxed{answer}."),
    # A concrete budget rather than an appeal: on GSM8K train the best of 17 on Qwen2.5-Coder-0.5B
    # and 16% fewer tokens at the same accuracy on the 1.5B (BENCHMARKS.md, issue 22).
    ("instruction", "Answer in at most three short lines."),
    ("evidence", "Tutors find that short, equation-only solutions are as accurate as long explanations, so write only the essential steps."),
    ("evidence", "Strong solvers get this kind of problem right in three or four short lines; extra words add mistakes, not accuracy."),
    ("role-play", "You are a teacher writing an answer key under time pressure: equations only, no sentences."),
    ("role-play", "Answer like a calculator's tape: one operation per line with its result, no prose."),
    ("emotion", "I'm reading this on my phone and long answers overwhelm me, so please keep it to a few short lines. Thank you!"),
    ("emotion", "You are good at this; trust yourself, skip what is obvious and write only the steps that matter."),
    ("consequences", "Every extra word costs time and money: solutions longer than five lines are rejected, so be brief and exact."),
    ("consequences", "Short solutions are graded higher here: a correct answer in the fewest steps earns full marks."),
    ("consequences", "You have room for 40 words at most; anything longer is cut off before the answer."),
)

MIN_WORDS, MAX_WORDS = 3, 80


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def candidate_id(text: str) -> str:
    """A stable short id for a suffix (its normalised text's hash): the folder its scores go in."""
    return hashlib.sha1(normalise(text).encode("utf-8")).hexdigest()[:10]


@dataclass(frozen=True)
class Candidate:
    text: str
    angle: str = "other"
    round: int = 0
    source: str = "starting set"  # "starting set", "file", or who wrote it ("target", a URL)

    @property
    def id(self) -> str:
        return candidate_id(self.text)

    def to_dict(self) -> dict:
        return {"id": self.id, **asdict(self)}


def starting_set() -> list[Candidate]:
    return [Candidate(text, angle) for angle, text in STARTING_SET]


_ITEM = re.compile(r"^\s*(?:[-*•]\s*|\(?\d{1,2}[.):]\s*)?")
_ANGLE = re.compile(r"^\s*[*_]*\s*\[?(" + "|".join(map(re.escape, ANGLES)) + r")\]?\s*[*_]*\s*[:\-–—]\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"
_QUOTED = re.compile(r'^["“](.+?)["”](?:\s*[(\[].*)?$')


def parse_suffixes(text: str, *, round: int = 0, source: str = "writer") -> list[Candidate]:
    """Suffixes in a writer's reply: one per line, as ``angle: suffix`` (numbering, bullets,
    bold and quotes tolerated). Lines that are too short or too long to be a suffix (headings,
    commentary) are skipped, as are repeats."""
    out, seen = [], set()
    for line in str(text).splitlines():
        line = _ITEM.sub("", line, count=1).strip()
        angle = "other"
        m = _ANGLE.match(line)
        if m:
            angle = m.group(1).lower()
            line = line[m.end() :]
        line = line.strip().strip("*_").strip()
        quoted = _QUOTED.match(line)
        if quoted:  # "suffix" (a note after it, such as the scores the writer was shown)
            line = quoted.group(1)
        line = line.strip(_QUOTES).strip()
        words = len(line.split())
        if not (MIN_WORDS <= words <= MAX_WORDS) or line.endswith(":"):
            continue
        key = normalise(line)
        if key in seen:
            continue
        seen.add(key)
        out.append(Candidate(line, angle, round, source))
    return out


def read_candidates(path: str) -> list[Candidate]:
    """``--candidates FILE``: one suffix per line (``angle: suffix`` or just the suffix); blank
    lines and lines starting with ``#`` are skipped."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidArgument("candidates", f"expected a text file with one suffix per line; {str(p)!r} is not a file")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    found = parse_suffixes("\n".join(lines), source="file")
    if not found:
        raise InvalidArgument("candidates", f"{str(p)!r} holds no suffix of {MIN_WORDS}-{MAX_WORDS} words")
    return found
