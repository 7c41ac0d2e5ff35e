"""Reading a user's corpus: the text that seeds suffix drafting's store or builds a datastore.

Two formats:

* ``.jsonl``: one document per line; a line is a JSON string, or an object with a ``text``
  field, or a conversation (``turns``: list of strings, as Spec-Bench's questions; or
  ``messages`` / ``conversations``: list of objects with ``content`` or ``value``), whose parts
  are joined with newlines.
* anything else: plain UTF-8 text, one document.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidArgument


def _document(row, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if isinstance(row.get("text"), str):
            return row["text"]
        for key in ("turns", "messages", "conversations"):
            parts = row.get(key)
            if isinstance(parts, list):
                texts = []
                for p in parts:
                    if isinstance(p, str):
                        texts.append(p)
                    elif isinstance(p, dict) and isinstance(p.get("content", p.get("value")), str):
                        texts.append(p.get("content", p.get("value")))
                if texts:
                    return "\n".join(texts)
    raise InvalidArgument(
        "corpus", f"{where}: expected a JSON string or an object with 'text', 'turns', 'messages' or 'conversations'"
    )


def read_documents(path: str | Path, argument: str = "corpus") -> Iterator[str]:
    """The documents of a corpus file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(argument, f"no file {str(path)!r}")
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InvalidArgument(argument, f"{path}:{number}: not JSON ({e.msg})") from None
                    text = _document(row, f"{path}:{number}")
                    if text:
                        yield text
        else:
            text = path.read_text(encoding="utf-8")
            if text.strip():
                yield text
    except UnicodeDecodeError:
        raise InvalidArgument(argument, f"{str(path)!r} is not UTF-8 text") from None


def tokenize_documents(tokenizer, path: str | Path, argument: str = "corpus") -> Iterator[list[int]]:
    """Token ids of each document (no special tokens: they are text to match, not prompts)."""
    for text in read_documents(path, argument):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            yield [int(t) for t in ids]
