"""Append-only jsonl files keyed by a row's ``key``: the resumable output of every step.

A step reads the keys already written, does only the rest, and appends each row (or chunk of
rows) as soon as it is done, flushing and fsyncing; a kill loses at most the rows in flight. A
truncated last line (a kill mid-write) is dropped on reading, and rewritten on the next run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.exists():
        return rows
    with path.open(encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the last line, cut by a kill
                break
            raise
    return rows


class JsonlStore:
    def __init__(self, path: str | Path, key: str = "key"):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_rows(self.path)
        self._repair(rows)
        self.rows: dict[Any, dict] = {}
        for r in rows:
            self.rows[self._k(r)] = r

    def _k(self, row: dict):
        k = row[self.key]
        return tuple(k) if isinstance(k, list) else k

    def _repair(self, rows: list[dict]) -> None:
        """Rewrite the file without a torn last line, so appends start on a fresh line."""
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, self.path)

    def __contains__(self, key) -> bool:
        return (tuple(key) if isinstance(key, list) else key) in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[self._k(r)] = r
