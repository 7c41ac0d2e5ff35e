"""``tokenskip compress``: score every token of each kept chain of thought, prune to each gamma.

Two scorers:

- ``llmlingua2`` (the paper's): LLMLingua-2's token classifier
  (``microsoft/llmlingua-2-xlm-roberta-large-meetingbank``, a bidirectional encoder trained to
  label which words a human summary keeps) through the ``llmlingua`` package's
  ``compress_prompt(cot, rate=gamma)``. It sees the whole chain of thought at once (both
  directions) and keeps words by their probability of being "preserved". Needs the package and
  the model from the Hugging Face hub.
- ``selfinfo`` (local): the self-information (surprisal) of each token under a causal LM,
  -log p(token | the tokens before it), as LLMLingua-1 and Selective Context score text: a token
  the model predicts easily carries little information and goes first. It reads left to right
  only, and it measures predictability, not task relevance (a number copied from the question
  is predictable once the question is in context, so the chain of thought is scored on its own,
  without the question). Any local causal LM works (default: the target itself).

Pruning, for both: units are whitespace-separated words (LLMLingua-2 keeps or drops words too).
``selfinfo`` scores a word by the mean surprisal of its tokens and keeps the highest-scoring
words, in their original order, until the kept tokens reach gamma x the chain's tokens (a word
that would overshoot is skipped for a smaller one), so the ratio is met within a word.
Kept words are joined by a space, or by the line break(s) of the text between them.

Numbers and equations: the paper's Qwen recipe calls ``compress_prompt(cot, rate=gamma)`` with
no forced tokens (LLMLingua-2 keeps numbers by itself: it learned from human compressions that
keep the facts); its LLaMA-3 recipe adds ``force_tokens=['Step', ':']``,
``force_reserve_digit=True``, ``drop_consecutive=True``. Surprisal, unlike LLMLingua-2, rates
the result of a computation as predictable ("48 / 2 = 24" after "half of 48") and prunes it
first, so ``keep_digits`` (every word holding a digit is kept, as ``force_reserve_digit``)
defaults to on for ``selfinfo`` and off for ``llmlingua2`` (the paper's Qwen recipe);
``force_tokens`` is off by default. Both scorers honour both when set.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument
from .prompts import PAPER_RATIOS, format_ratio
from .runs import check_settings, model_label, progress_bar
from .solve import SOLVE_FILE
from .store import JsonlStore, read_rows

COMPRESS_FILE = "compressed.jsonl"
SCORERS = ("selfinfo", "llmlingua2")
LLMLINGUA2_MODEL = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"
_WORD = re.compile(r"\S+")


@dataclass
class Word:
    start: int  # character span in the text
    end: int
    score: float  # importance: higher is kept first
    cost: int  # tokens it holds


def split_words(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _WORD.finditer(text)]


def words_from_tokens(text: str, offsets: list[tuple[int, int]], scores: list[float]) -> list[Word]:
    """Token scores -> word scores: a token belongs to the word holding its first non-space
    character; a word's score is the mean of its tokens' (a word without a token of its own,
    inside a token that began earlier, takes that token's score at no cost)."""
    spans = split_words(text)
    owner = [-1] * len(text)
    for w, (s, e) in enumerate(spans):
        for c in range(s, e):
            owner[c] = w
    sums, counts, cover = [0.0] * len(spans), [0] * len(spans), [None] * len(spans)
    for (s, e), score in zip(offsets, scores):
        first = next((c for c in range(s, min(e, len(text))) if not text[c].isspace()), None)
        if first is None:
            continue  # whitespace only (a line break token)
        w = owner[first]
        sums[w] += score
        counts[w] += 1
        for c in range(first, min(e, len(text))):
            if owner[c] >= 0 and cover[owner[c]] is None:
                cover[owner[c]] = score
    words = []
    for w, (s, e) in enumerate(spans):
        score = sums[w] / counts[w] if counts[w] else (cover[w] if cover[w] is not None else 0.0)
        words.append(Word(s, e, score, counts[w]))
    return words


def prune(words: list[Word], ratio: float, forced: list[bool] | None = None) -> list[int]:
    """Indices (in order) of the words kept at ``ratio``: forced ones, then the best-scoring
    until their tokens reach ratio x all tokens (ties: the earlier word first)."""
    if not 0.0 < ratio <= 1.0:
        raise InvalidArgument("ratio", f"expected a ratio in (0, 1], got {ratio!r}")
    if ratio == 1.0:
        return list(range(len(words)))
    total = sum(w.cost for w in words)
    budget = ratio * total
    keep = [bool(forced and forced[i]) for i in range(len(words))]
    used = sum(w.cost for w, k in zip(words, keep) if k)
    for i in sorted(range(len(words)), key=lambda i: (-words[i].score, i)):
        if keep[i]:
            continue
        if used + words[i].cost <= budget + 1e-9:
            keep[i] = True
            used += words[i].cost
    return [i for i, k in enumerate(keep) if k]


def join_words(text: str, words: list[Word], kept: list[int]) -> str:
    """The kept words in order, separated by a space or by the line breaks between them."""
    out = []
    prev_end = None
    for i in kept:
        w = words[i]
        if prev_end is not None:
            gap = text[prev_end : w.start]
            newlines = gap.count("\n")
            out.append("\n\n" if newlines >= 2 else "\n" if newlines == 1 else " ")
        out.append(text[w.start : w.end])
        prev_end = w.end
    return "".join(out)


def forced_words(text: str, words: list[Word], keep_digits: bool, force_tokens: tuple[str, ...]) -> list[bool]:
    out = []
    for w in words:
        piece = text[w.start : w.end]
        out.append((keep_digits and any(c.isdigit() for c in piece)) or any(t in piece for t in force_tokens))
    return out


class SelfInfoScorer:
    """Token surprisal under a local causal LM (transformers; float32 unless told)."""

    name = "selfinfo"

    def __init__(self, model: str, *, dtype: str = "float32", device: str = "cpu", progress: bool = True):
        import torch
        from transformers import AutoModelForCausalLM

        from ..hub import resolve_model
        from ..loading import load_tokenizer, parse_dtype

        self.path = resolve_model(str(model), progress=progress)
        self.tokenizer = load_tokenizer(self.path)
        if not getattr(self.tokenizer, "is_fast", False):
            raise InvalidArgument("scorer_model", f"{str(self.path)!r}: the selfinfo scorer needs a fast tokenizer (character offsets)")
        torch_dtype = parse_dtype(dtype) or torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=torch_dtype).to(device).eval()
        self.device = device
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def token_scores(self, text: str) -> tuple[list[tuple[int, int]], list[float]]:
        """(character offsets, surprisal in nats) of each token of ``text``. The first token is
        scored after BOS when the tokenizer has one, else it is always kept (infinite score)."""
        import torch

        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        if not ids:
            return [], []
        bos = self.tokenizer.bos_token_id
        prefix = [bos] if bos is not None else []
        seq, n0 = prefix + ids, len(prefix)
        scores: list[float | None] = [None] * len(ids)
        if ids and not prefix:
            scores[0] = math.inf
        window, lo = max(2, self.max_len), 0
        with torch.no_grad():
            # Texts longer than the model's context: windows, each re-reading half the last one.
            while True:
                hi = min(len(seq), lo + window)
                x = torch.tensor([seq[lo:hi]], device=self.model.device)
                logp = torch.log_softmax(self.model(x).logits[0].float(), dim=-1)
                for j in range(max(lo + 1, n0), hi):
                    if scores[j - n0] is None:
                        scores[j - n0] = float(-logp[j - 1 - lo, seq[j]])
                if hi >= len(seq):
                    break
                lo += window // 2
        return offsets, scores

    def words(self, text: str) -> list[Word]:
        offsets, scores = self.token_scores(text)
        return words_from_tokens(text, offsets, scores)

    def compress(self, text: str, ratios: list[float], keep_digits: bool, force_tokens: tuple[str, ...]) -> dict[float, str]:
        words = self.words(text)
        forced = forced_words(text, words, keep_digits, force_tokens)
        return {g: join_words(text, words, prune(words, g, forced)) for g in ratios}


class LLMLingua2Scorer:
    """LLMLingua-2 through the ``llmlingua`` package (imported only when chosen)."""

    name = "llmlingua2"

    def __init__(self, model: str | None = None, *, device: str = "cpu", progress: bool = True):
        try:
            from llmlingua import PromptCompressor
        except ModuleNotFoundError:
            raise InvalidArgument(
                "scorer", "llmlingua2 needs the llmlingua package (pip install llmlingua) and hub access to "
                f"{LLMLINGUA2_MODEL}; without them use --scorer selfinfo"
            ) from None  # fmt: skip
        self.compressor = PromptCompressor(model_name=model or LLMLINGUA2_MODEL, use_llmlingua2=True, device_map=device)

    def compress(self, text: str, ratios: list[float], keep_digits: bool, force_tokens: tuple[str, ...]) -> dict[float, str]:
        out = {}
        for g in ratios:
            if g == 1.0:
                out[g] = text
                continue
            r = self.compressor.compress_prompt(text, rate=g, force_tokens=list(force_tokens),
                                                force_reserve_digit=keep_digits, drop_consecutive=bool(force_tokens))  # fmt: skip
            out[g] = r["compressed_prompt"]
        return out


def make_scorer(scorer: str, model: str, scorer_model: str | None, *, dtype: str, device: str, progress: bool):
    if scorer == "selfinfo":
        return SelfInfoScorer(scorer_model or model, dtype=dtype, device=device, progress=progress)
    if scorer == "llmlingua2":
        return LLMLingua2Scorer(scorer_model, device=device, progress=progress)
    raise InvalidArgument("scorer", f"expected one of {', '.join(SCORERS)}, got {scorer!r}")


def compress(model: str, out: str, *, scorer: str = "selfinfo", scorer_model: str | None = None,
             ratios: list[float] = PAPER_RATIOS, keep_digits: bool | None = None, force_tokens: tuple[str, ...] = (),
             dtype: str = "float32", device: str = "cpu", progress: bool = True, limit: int | None = None) -> dict:  # fmt: skip
    """Compress every kept chain of thought of ``out/solve.jsonl`` to each ratio, appending to
    ``out/compressed.jsonl`` (keyed by problem index). Token counts use ``model``'s tokenizer."""
    from ..hub import resolve_model
    from ..loading import load_tokenizer

    if scorer not in SCORERS:
        raise InvalidArgument("scorer", f"expected one of {', '.join(SCORERS)}, got {scorer!r}")
    if keep_digits is None:
        keep_digits = scorer == "selfinfo"
    ratios = [float(g) for g in ratios]
    for g in ratios:
        if not 0.0 < g < 1.0:
            raise InvalidArgument("ratios", f"compression ratios are in (0, 1) (1.0 is the uncompressed chain); got {g!r}")
    out_dir = Path(out)
    source = out_dir / SOLVE_FILE
    if not source.exists():
        raise InvalidArgument("out", f"{str(out_dir)!r} has no {SOLVE_FILE}: run `specdecode tokenskip solve --out {out}` first")
    solved = read_rows(source)
    rows = [r for r in solved if r.get("kept")]
    if not rows:
        raise InvalidArgument(
            "out", f"{str(source)!r} has no kept chain of thought (correct, <= 500 tokens) among its {len(solved)} "
            "answers: nothing to compress; solve more problems (or with a stronger model)"
        )  # fmt: skip
    rows.sort(key=lambda r: r["index"])
    if limit is not None:
        rows = rows[:limit]
    settings = {"model": model_label(model), "scorer": scorer, "scorer_model": scorer_model and model_label(scorer_model),
                "ratios": ratios, "keep_digits": keep_digits, "force_tokens": list(force_tokens)}  # fmt: skip
    check_settings(out_dir / "compress_settings.json", settings, "compress")
    store = JsonlStore(out_dir / COMPRESS_FILE, key="index")
    todo = [r for r in rows if r["index"] not in store]
    if todo:
        tok = load_tokenizer(resolve_model(str(model), progress=progress))
        engine = make_scorer(scorer, model, scorer_model, dtype=dtype, device=device, progress=progress)
        bar = progress_bar(len(rows), f"compress ({scorer})", progress, initial=len(rows) - len(todo))

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        for r in todo:
            cot = r["output"].split("\n\nThe final answer is:")[0]
            original = count(cot)
            pruned = engine.compress(cot, ratios, keep_digits, tuple(force_tokens))
            compressed = {}
            for g in ratios:
                n = count(pruned[g])
                compressed[format_ratio(g)] = {"text": pruned[g], "tokens": n, "ratio": n / original if original else 1.0}
            store.append([{"index": r["index"], "question": r["question"], "answer": r["prediction"], "cot": cot,
                           "cot_tokens": original, "compressed": compressed}])  # fmt: skip
            bar.update(1)
        bar.close()
    return summarize_compress(out_dir, ratios)


def summarize_compress(out_dir: Path, ratios: list[float]) -> dict:
    import json

    rows = read_rows(Path(out_dir) / COMPRESS_FILE)
    summary = {"chains": len(rows), "ratios": {}}
    for g in ratios:
        key = format_ratio(g)
        got = [r["compressed"][key]["ratio"] for r in rows if key in r["compressed"]]
        tokens = sum(r["compressed"][key]["tokens"] for r in rows if key in r["compressed"])
        original = sum(r["cot_tokens"] for r in rows if key in r["compressed"])
        summary["ratios"][key] = {"mean_ratio": sum(got) / len(got) if got else None,
                                  "token_ratio": tokens / original if original else None}  # fmt: skip
    (Path(out_dir) / "compress_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
