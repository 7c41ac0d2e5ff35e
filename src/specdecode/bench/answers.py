"""Answer files in Spec-Bench's format: one JSON line per question, one file per method and run.

Each line holds what Spec-Bench's ``evaluation/speed.py`` reads::

    {"question_id", "category", "answer_id", "model_id", "tstamp",
     "choices": [{"index": 0, "turns": [text per turn], "decoding_steps": [per turn],
                  "new_tokens": [per turn], "wall_time": [seconds per turn],
                  "accept_lengths": [tokens emitted by each decoding step, all turns]}]}

plus fields of our own that its scripts ignore: in the choice ``token_ids`` (per turn, for the
exact-match check), ``drafted_tokens``, ``accepted_draft_tokens``, ``peak_memory`` (bytes,
per turn) and ``first_token_time`` (seconds until the first decoding step's tokens, per turn:
what decode speed, prompt excluded, is measured after); at the top ``method`` and ``config`` (model and settings), which let an interrupted
run resume only into a file written with the same settings.

Layout under the output folder: ``answers/run-<r>/<method>.jsonl``; Ray workers write
``answers/run-<r>/shards/<method>.worker-<i>.jsonl``, merged into the main file at the end.
Lines are appended one whole line at a time, so an interruption can at worst cut the last
line, which resuming drops.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument

CHOICE_PER_TURN = ("turns", "decoding_steps", "new_tokens", "wall_time")
REQUIRED = ("question_id", "category", "answer_id", "model_id", "tstamp", "choices")
_RUN_DIR = re.compile(r"^run-(\d+)$")


def model_id(model: str, method: str, dtype: str, temperature: float) -> str:
    """Spec-Bench's naming of a model and method: ``<model>-<method>-<dtype>-temp-<temperature>``."""
    return f"{model}-{method}-{dtype}-temp-{temperature}"


def make_record(question, method: str, model: str, config: dict[str, Any], turns: list[dict[str, Any]]) -> dict[str, Any]:
    """One answer line. ``turns``: per turn a dict with ``text``, ``decoding_steps``,
    ``new_tokens``, ``wall_time``, ``accept_lengths`` (list), ``token_ids``, ``drafted_tokens``,
    ``accepted_draft_tokens`` and ``peak_memory``; ``model`` is the Spec-Bench model_id."""
    choice: dict[str, Any] = {"index": 0, "turns": [t["text"] for t in turns]}
    for key in CHOICE_PER_TURN[1:]:
        choice[key] = [t[key] for t in turns]
    choice["accept_lengths"] = [n for t in turns for n in t["accept_lengths"]]
    for key in ("token_ids", "drafted_tokens", "accepted_draft_tokens", "peak_memory"):
        choice[key] = [t[key] for t in turns]
    choice["first_token_time"] = [t.get("first_token_time") for t in turns]
    choice["verified_draft_tokens"] = [t.get("verified_draft_tokens") for t in turns]
    choice["drafter_bytes"] = [t.get("drafter_bytes") for t in turns]
    return {
        "question_id": question.question_id,
        "category": question.category,
        "answer_id": uuid.uuid4().hex,
        "model_id": model,
        "tstamp": time.time(),
        "choices": [choice],
        "method": method,
        "config": config,
    }


def _check_record(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise InvalidArgument("answers", f"{where}: expected a JSON object")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise InvalidArgument("answers", f"{where}: missing {', '.join(missing)}")
    choices = row["choices"]
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise InvalidArgument("answers", f"{where}: 'choices' must be a non-empty list of objects")
    choice = choices[0]
    lists = {k: choice.get(k) for k in (*CHOICE_PER_TURN, "accept_lengths")}
    bad = [k for k, v in lists.items() if not isinstance(v, list)]
    if bad:
        raise InvalidArgument("answers", f"{where}: choices[0] needs lists {', '.join(bad)}")
    if len({len(lists[k]) for k in CHOICE_PER_TURN}) != 1:
        raise InvalidArgument("answers", f"{where}: choices[0] has per-turn lists of different lengths")
    return row


def read_answers(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """All answers in ``path``. A last line cut short by an interruption (no newline, not JSON)
    is dropped, and with ``repair`` removed from the file; any other bad line is an error."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if number == len(lines):  # the last line, no newline after it: cut by an interruption
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(len(data) - len(raw))
                break
            raise InvalidArgument("answers", f"{where}: not valid JSON ({e})") from None
        records.append(_check_record(row, where))
    return records


def check_resumable(records: list[dict[str, Any]], config: dict[str, Any], path: Path) -> None:
    """Refuse to add answers to a file written for another model or other settings."""
    for number, row in enumerate(records, 1):
        theirs = row.get("config")
        if theirs == config:
            continue
        hint = "use another --out folder, or --overwrite to start again"
        if not isinstance(theirs, dict):
            raise InvalidArgument("answers", f"{path}: answer {number} was not written by specdecode bench; {hint}")
        if theirs.get("model") != config["model"]:
            raise InvalidArgument(
                "answers",
                f"{path} holds answers of model {theirs.get('model')!r}, not {config['model']!r}; {hint}",
            )
        differ = sorted(k for k in set(theirs) | set(config) if theirs.get(k) != config.get(k))
        details = ", ".join(f"{k}={theirs.get(k)!r} (now {config.get(k)!r})" for k in differ)
        raise InvalidArgument("answers", f"{path} was written with other settings: {details}; {hint}")


def append_answer(path: Path, record: dict[str, Any]) -> None:
    """Append one answer as one whole line (a single write, flushed to disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_answers(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` atomically with ``records`` sorted by question_id, one per question
    (the first answer kept), as Spec-Bench's ``reorg_answer_file`` leaves its files."""
    unique: dict[int, dict[str, Any]] = {}
    for row in records:
        unique.setdefault(row["question_id"], row)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for qid in sorted(unique):
            f.write(json.dumps(unique[qid], ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def answer_path(out: Path, run: int, method: str) -> Path:
    return out / "answers" / f"run-{run}" / f"{method}.jsonl"


def shard_path(out: Path, run: int, method: str, worker: int) -> Path:
    return out / "answers" / f"run-{run}" / "shards" / f"{method}.worker-{worker}.jsonl"


def merge_shards(out: Path, run: int, method: str) -> list[dict[str, Any]]:
    """Fold any worker shards of (run, method) into the main file, de-duplicated by question_id;
    the shards are removed. Returns the merged answers."""
    main = answer_path(out, run, method)
    records = read_answers(main, repair=True)
    shards = sorted(main.parent.glob(f"shards/{method}.worker-*.jsonl"))
    if not shards:
        return records
    for shard in shards:
        records.extend(read_answers(shard, repair=True))
    write_answers(main, records)
    for shard in shards:
        shard.unlink()
    try:
        (main.parent / "shards").rmdir()
    except OSError:
        pass  # other methods' shards are still there
    return read_answers(main)


def discover(out: Path) -> dict[int, dict[str, Path]]:
    """{run: {method: answer file}} for every answer file under ``out/answers``."""
    found: dict[int, dict[str, Path]] = {}
    root = out / "answers"
    if not root.is_dir():
        return found
    for run_dir in root.iterdir():
        m = _RUN_DIR.match(run_dir.name)
        if m and run_dir.is_dir():
            files = {p.stem: p for p in sorted(run_dir.glob("*.jsonl"))}
            if files:
                found[int(m.group(1))] = files
    return dict(sorted(found.items()))
