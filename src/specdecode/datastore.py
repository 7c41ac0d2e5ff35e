"""A retrieval datastore for REST: a tokenized corpus and its suffix array, built once.

(He et al., "REST: Retrieval-Based Speculative Decoding", NAACL 2024.) The corpus is tokenized
with the target's tokenizer and its documents concatenated, each followed by a separator (-1), so
no match runs from one document into the next. The suffix array (start positions of all
suffixes in lexicographic order, separators and the end sorting first) is built by prefix
doubling with numpy sorts, O(n log^2 n). Both are saved as .npy files with a ``meta.json`` that
records the tokenizer, so that a datastore is never used with a model that speaks other tokens.

A query finds the longest suffix of the context (at most ``max_match`` tokens) that occurs in
the corpus, by binary search over the suffix array (the match length itself is found by binary
search, since a suffix that occurs has every shorter suffix occurring too), then reads what
followed its occurrences: a sorted range of the array, sampled evenly, so that frequent
continuations are sampled in proportion.

Unlike the suffix automaton of ``suffix`` drafting (dicts per state, a few hundred bytes per
token), this costs 8 bytes per corpus token and loads memory-mapped, so it suits corpora of
millions of tokens; it is static, which retrieval needs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import InvalidArgument

SEPARATOR = -1
FORMAT = 1
TOKENS_FILE, ARRAY_FILE, META_FILE = "tokens.npy", "suffix_array.npy", "meta.json"


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a vocabulary: the same tokens with the same ids give the same fingerprint."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Start positions of the suffixes of ``tokens`` in lexicographic order (a suffix that ends
    first sorts first; -1 sorts before every token id)."""
    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = tokens.astype(np.int64) + 1  # separator -> 0, tokens -> 1..
    sa = np.argsort(rank, kind="stable")
    k = 1
    while True:
        second = np.full(n, -1, dtype=np.int64)  # rank of the suffix k further on; -1: past the end
        second[: n - k] = rank[k:]
        sa = np.lexsort((second, rank))
        r, s = rank[sa], second[sa]
        changed = np.empty(n, dtype=np.int64)
        changed[0] = 0
        changed[1:] = (r[1:] != r[:-1]) | (s[1:] != s[:-1])
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[sa] = np.cumsum(changed)
        rank = new_rank
        if rank[sa[-1]] == n - 1 or k >= n:  # all distinct
            return sa
        k *= 2


class Datastore:
    def __init__(self, tokens: np.ndarray, array: np.ndarray, meta: dict):
        self.tokens = tokens
        self.array = array
        self.meta = meta

    def __len__(self) -> int:
        return len(self.tokens)

    # ---- building and loading -----------------------------------------------------------------
    @classmethod
    def from_documents(cls, documents, meta: dict | None = None) -> "Datastore":
        parts = []
        count = 0
        for doc in documents:
            parts.append(np.asarray(doc, dtype=np.int32))
            parts.append(np.array([SEPARATOR], dtype=np.int32))
            count += 1
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        array = suffix_array(tokens)
        dtype = np.int32 if len(tokens) < 2**31 else np.int64
        meta = {"format": FORMAT, "documents": count, "tokens": int(len(tokens) - count), **(meta or {})}
        return cls(tokens, array.astype(dtype), meta)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / TOKENS_FILE, self.tokens)
        np.save(folder / ARRAY_FILE, self.array)
        (folder / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, argument: str = "datastore") -> "Datastore":
        folder = Path(folder)
        if not (folder / META_FILE).is_file():
            raise InvalidArgument(argument, f"{str(folder)!r} is not a datastore (no {META_FILE}); build one with `specdecode datastore build`")
        try:
            meta = json.loads((folder / META_FILE).read_text())
            tokens = np.load(folder / TOKENS_FILE, mmap_mode="r")
            array = np.load(folder / ARRAY_FILE, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise InvalidArgument(argument, f"cannot read the datastore in {str(folder)!r}: {e}") from None
        if meta.get("format") != FORMAT or len(tokens) != len(array):
            raise InvalidArgument(argument, f"{str(folder)!r}: unknown format or damaged files; build it again")
        return cls(tokens, array, meta)

    # ---- queries -------------------------------------------------------------------------------
    def _lower_bound(self, pattern: list[int], lo: int = 0, hi: int | None = None) -> int:
        """First index of the array whose suffix is >= ``pattern`` (compared on len(pattern) tokens)."""
        hi = len(self.array) if hi is None else hi
        m = len(pattern)
        tokens, array = self.tokens, self.array
        while lo < hi:
            mid = (lo + hi) // 2
            p = int(array[mid])
            if tokens[p : p + m].tolist() < pattern:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _upper_bound(self, pattern: list[int], lo: int = 0, hi: int | None = None) -> int:
        """First index whose suffix is > ``pattern`` on len(pattern) tokens."""
        hi = len(self.array) if hi is None else hi
        m = len(pattern)
        tokens, array = self.tokens, self.array
        while lo < hi:
            mid = (lo + hi) // 2
            p = int(array[mid])
            if tokens[p : p + m].tolist() <= pattern:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def occurs(self, pattern: list[int]) -> bool:
        i = self._lower_bound(pattern)
        if i >= len(self.array):
            return False
        p = int(self.array[i])
        return self.tokens[p : p + len(pattern)].tolist() == pattern

    def longest_match(self, context: list[int], max_match: int, min_match: int = 1) -> tuple[int, int, int]:
        """(lo, hi, length): the array range of the occurrences of the longest suffix of
        ``context`` (``min_match`` to ``max_match`` tokens) that occurs; length 0 if none."""
        lo_len, hi_len = min_match, min(max_match, len(context))
        if hi_len < lo_len or not self.occurs(list(context[-lo_len:])):
            return 0, 0, 0
        while lo_len < hi_len:  # the longest length that occurs
            mid = (lo_len + hi_len + 1) // 2
            if self.occurs(list(context[-mid:])):
                lo_len = mid
            else:
                hi_len = mid - 1
        pattern = list(context[-lo_len:])
        lo = self._lower_bound(pattern)
        return lo, self._upper_bound(pattern, lo), lo_len

    def continuations(self, lo: int, hi: int, length: int, depth: int, samples: int) -> list[list[int]]:
        """What followed (up to ``depth`` tokens, not past a document's end) the occurrences in
        array range [lo, hi) of a ``length``-token match; at most ``samples`` of them, evenly
        spread over the range (which is sorted by what follows)."""
        if hi - lo > samples:
            picks = np.linspace(lo, hi - 1, samples).round().astype(np.int64)
        else:
            picks = np.arange(lo, hi)
        out = []
        for i in picks.tolist():
            start = int(self.array[i]) + length
            cont = self.tokens[start : start + depth].tolist()
            if SEPARATOR in cont:
                cont = cont[: cont.index(SEPARATOR)]
            if cont:
                out.append(cont)
        return out


def build_datastore(corpus: str | Path, out: str | Path, tokenizer, model_name: str) -> Datastore:
    """Tokenize ``corpus`` (text or jsonl, see corpus.py) and save its datastore in ``out``."""
    from .corpus import tokenize_documents

    docs = list(tokenize_documents(tokenizer, corpus))
    if not docs:
        raise InvalidArgument("corpus", f"{str(corpus)!r} holds no text")
    meta = {
        "model": model_name, "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer.get_vocab()), "corpus": str(corpus),
    }  # fmt: skip
    store = Datastore.from_documents(docs, meta)
    store.save(out)
    return store
