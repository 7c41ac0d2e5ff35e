"""From token ids to streamed text: incremental detokenization and stop strings.

``OutputText`` puts the two together for one generation, step by step; the engine's stream and
the batch scheduler both use it, so a request's text, its stop and what it counts as output
are the same whichever runs it.

Decoding the whole output again at every step costs time quadratic in its length. Tokenizers
cannot decode token by token either (a byte-level BPE token may hold half a character; a
SentencePiece token's leading space depends on what precedes it). The usual way out (as in
text-generation-inference and vLLM): decode a short window that starts a few tokens back, and
emit what the newest tokens add to that window's text, once it is not a partial character.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a tokenizer decodes half a UTF-8 character to


class IncrementalDetokenizer:
    """Text of a growing list of token ids, at a cost per step that does not grow with it."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # text of ids[:read]
        self._prefix = 0  # the window starts here: tokens that only give context
        self._read = 0  # tokens whose text is already in self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the text they complete (may be empty while a character is
        incomplete)."""
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            delta = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        delta = after[len(before) :] if len(after) > len(before) else ""
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta


def find_stop(text: str, stop: list[str], emitted: int) -> int | None:
    """Index of the earliest stop string in ``text`` not before what may already be out."""
    best = None
    for s in stop:
        i = text.find(s, max(0, emitted - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def safe_end(text: str, stop: list[str]) -> int:
    """How much of ``text`` can go out: not a tail that a later token could complete into a
    stop string."""
    end = len(text)
    held = end
    for s in stop:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:n], 0, end):
                held = min(held, end - n)
                break
    return held


def trim_to_stop(tokenizer, ids: list[int], stop: list[str], keep: int) -> list[int]:
    """The shortest prefix of ``ids`` (at least ``keep`` long) whose text contains a stop string.

    Only the last step's tokens can be cut (the text before them held no stop string), so this
    decodes a few prefixes, not the whole history."""
    while len(ids) > max(keep, 1):
        if find_stop(tokenizer.decode(ids[:-1], skip_special_tokens=True), stop, 0) is None:
            break
        ids = ids[:-1]
    return ids


class OutputText:
    """One generation's output as its decoding steps arrive: the text released so far (a tail
    that a later token could complete into a stop string is held back), where a stop string
    cut it, and why it finished."""

    def __init__(self, tokenizer, stop: list[str], eos_ids: set[int]):
        self.tokenizer, self.stop, self.eos_ids = tokenizer, stop, eos_ids
        self.detok = IncrementalDetokenizer(tokenizer)
        self.emitted = 0  # characters of the text already released
        self.finish_reason = "length"  # until an EOS or a stop string
        self.stopped = False  # a stop string ended the output: nothing more may be added

    @property
    def ids(self) -> list[int]:
        return self.detok.ids

    @property
    def text(self) -> str:
        return self.detok.text

    def add(self, tokens: list[int]) -> tuple[list[int], str]:
        """A step's tokens -> (those that are output, the text released now). A stop string
        ends the output: the step's tokens after the one that completes it are dropped, and
        the text is cut where the stop string begins."""
        detok = self.detok
        before = len(detok.ids)
        detok.add(tokens)
        if detok.ids[-1] in self.eos_ids:
            self.finish_reason = "stop"
        hit = find_stop(detok.text, self.stop, self.emitted) if self.stop else None
        if hit is not None:
            detok.ids = trim_to_stop(self.tokenizer, detok.ids, self.stop, keep=before + 1)
            detok.text = detok.text[:hit]
            self.finish_reason, self.stopped = "stop", True
            return list(tokens[: len(detok.ids) - before]), self._release(len(detok.text))
        return list(tokens), self._release(safe_end(detok.text, self.stop))

    def close(self) -> str:
        """The end of the output: the text still held back (an incomplete character decodes
        as U+FFFD; after a stop string there is none)."""
        if not self.stopped:
            self.detok.flush()
        return self._release(len(self.detok.text))

    def _release(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece, self.emitted = self.detok.text[self.emitted : end], end
        return piece
