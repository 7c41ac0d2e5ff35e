"""What bounds the model-free drafters on a model and a question set: an oracle over their sources.

A lookup drafter (pld, suffix, rest) or token recycling can only propose what its source holds.
This script measures how much of a bench run's output those sources hold at all, so that a
speedup goal can be judged against what is reachable rather than hoped for:

1. For every answer of a finished ``specdecode bench`` run (the baseline's greedy answers), one
   teacher-forced forward of the target over prompt + answer gives the target's own top-k after
   every token (what token recycling would have recorded had it seen that position).
2. Sources, each replayed in question order as a server would see them:
   - ``request``: any earlier occurrence in the prompt and output so far of the text's last 1-8
     tokens, and what followed it (pld's and suffix's in-request match);
   - ``store``: the same in earlier questions' prompts and answers (suffix's cross-request store);
   - ``recycle``: any path through the table "top-4 tokens the target predicted after this token,
     the latest time it was verified" (token recycling); ``+prompt``: the table also learns the
     prompt's positions (which costs the lm_head over the whole prompt in a real run).
3. The oracle: at each step, verify exactly the longest correct continuation that any of the
   chosen sources holds (the perfect draft among them, perfectly sized, drafted for free), at the
   cost T(accepted + 1) of the machine's measured cost curve. No drafter over those sources can
   do better. Decode speedup per subtask, and Spec-Bench's total-time speedup with the baseline's
   own share of time spent in the prompt's prefill (which no drafter shortens).
   The ``top-1 recycle`` line is a real policy instead: always verify the table's best guess
   (free where T(2) = T(1)).

    python benchmarks/lookup_bound.py --model qwen2.5-coder-1.5b \\
        --answers bench_out/issue11b/qwen2.5-coder-1.5b/answers/run-1/vanilla.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from specdecode.bench.answers import read_answers
from specdecode.bench.conversation import Conversation
from specdecode.bench.questions import SUBTASKS, load_questions, subtask_of
from specdecode.costmodel import CostModel
from specdecode.engine import Engine

TOP_K = 4  # children per node of the recycle table, as recycle's default branch
MAX_CONTEXT = 8  # longest matched context the lookup sources try
MAX_DRAFT = 16  # longest continuation the oracle may verify (the engine's default cap)


def teacher_forced(engine: Engine, questions: dict, answers_path: Path, chunk: int = 256) -> list[dict]:
    """Per turn: prompt ids, answer ids, the target's top-k ids after every token, wall times."""
    target, turns = engine.target, []
    answers = read_answers(answers_path)
    if not answers:
        raise SystemExit(f"no answers in {answers_path}")
    for answer in answers:
        choice = answer["choices"][0]
        conv = Conversation(engine.tokenizer)
        for i, (turn, ids) in enumerate(zip(questions[answer["question_id"]].turns, choice["token_ids"])):
            prompt = engine.encode(conv.ask(turn))
            conv.answer(choice["turns"][i])
            full = prompt + ids
            target.reset()
            top = []
            with torch.no_grad():
                for start in range(0, len(full), chunk):
                    logits = target.forward(torch.tensor(full[start : start + chunk]))
                    top += logits.topk(TOP_K, dim=-1).indices.tolist()
            turns.append({
                "subtask": subtask_of(answer["category"]), "prompt": prompt, "ids": ids, "top": top,
                "wall": choice["wall_time"][i], "prefill": choice["first_token_time"][i],
            })  # fmt: skip
            print(f"  question {answer['question_id']} turn {i + 1}: {len(prompt)} + {len(ids)} tokens", flush=True)
    return turns


class NgramIndex:
    """Where each n-gram (n <= MAX_CONTEXT) of some texts ends: the drafters' lookup, brute force."""

    def __init__(self) -> None:
        self.texts: list[list[int]] = []
        self.ends: dict[tuple[int, ...], list[tuple[int, int]]] = collections.defaultdict(list)
        self.indexed = 0  # of the last text, n-grams ending at or before this are indexed

    def add(self, text: list[int], upto: int | None = None) -> None:
        """Start indexing a text; ``upto``: only its first tokens (``extend`` adds the rest)."""
        self.texts.append(text)
        self.indexed = 0
        self.extend(len(text) if upto is None else upto)

    def extend(self, upto: int) -> None:
        idx, text = len(self.texts) - 1, self.texts[-1]
        for end in range(self.indexed + 1, upto + 1):
            for n in range(1, min(MAX_CONTEXT, end) + 1):
                self.ends[tuple(text[end - n : end])].append((idx, end))
        self.indexed = max(self.indexed, upto)

    def longest(self, seq: list[int], want: list[int], limit: int | None = None) -> int:
        """Longest prefix of ``want`` that follows an indexed occurrence of an end of ``seq``
        (within the first ``limit`` tokens of the text, where given: the request's past)."""
        best = 0
        for n in range(1, min(MAX_CONTEXT, len(seq)) + 1):
            found = self.ends.get(tuple(seq[-n:]))
            if not found:
                break  # no longer context occurs either
            for idx, end in found:
                text = self.texts[idx]
                stop = len(text) if limit is None else min(limit, len(text))
                k = 0
                while k < len(want) and end + k < stop and text[end + k] == want[k]:
                    k += 1
                best = max(best, k)
        return best


def recycled(table: dict, last: int, want: list[int]) -> int:
    """Longest prefix of ``want`` spelled by a path of the recycle table from ``last``."""
    k = 0
    while k < len(want) and want[k] in table.get(last, ()):
        last = want[k]
        k += 1
    return k


def oracle(turns: list[dict], cost: CostModel, sources: set[str], top1: bool = False) -> dict[str, list[float]]:
    """Per subtask: [tokens, relative decode cost, baseline wall, baseline prefill]."""
    table: dict[int, list[int]] = {}
    store = NgramIndex()
    out = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    t1 = cost.forward(1, 128)
    for turn in turns:
        prompt, full, top = turn["prompt"], turn["prompt"] + turn["ids"], turn["top"]
        if "prompt" in sources:
            for i in range(len(prompt) - 1):
                table[full[i]] = top[i]
        pos, row = len(prompt), out[turn["subtask"]]
        request = NgramIndex()
        request.add(full, pos - 1)  # occurrences whose next token is known by then
        while pos < len(full):
            request.extend(pos - 1)
            seq, want = full[:pos], full[pos : pos + MAX_DRAFT]
            if top1:
                guess = table.get(seq[-1], [None])[0]
                acc, verified = int(guess == want[0]), int(guess is not None)
            else:
                acc = 0
                if "request" in sources:
                    acc = max(acc, request.longest(seq, want, limit=pos))
                if "store" in sources:
                    acc = max(acc, store.longest(seq, want))
                if "recycle" in sources:
                    acc = max(acc, recycled(table, seq[-1], want))
                verified = acc
            acc = min(acc, len(full) - pos - 1)
            for q in range(pos - 1, pos + acc):  # the verification forward's rows: all recorded
                table[full[q]] = top[q]
            row[0] += acc + 1
            row[1] += cost.forward(verified + 1, pos) / t1
            pos += acc + 1
        row[2] += turn["wall"]
        row[3] += turn["prefill"]
        if "store" in sources:
            store.add(full)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--answers", required=True, type=Path, help="a bench run's baseline answers (jsonl)")
    ap.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, help="keep the teacher-forced top-k here (json) and reuse it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model, "vanilla", dtype="bfloat16", progress=False)
    cost = CostModel.for_target(engine.target)
    print(cost.describe())
    if args.cache and args.cache.exists():
        turns = json.loads(args.cache.read_text())
    else:
        questions = {q.question_id: q for q in load_questions(args.questions)}
        turns = teacher_forced(engine, questions, args.answers)
        if args.cache:
            args.cache.write_text(json.dumps(turns))
    rows = [
        ("top-1 recycle (a real policy)", {"recycle"}, True),
        ("oracle: request", {"request"}, False),
        ("oracle: request + store", {"request", "store"}, False),
        ("oracle: recycle", {"recycle"}, False),
        ("oracle: recycle + prompt", {"recycle", "prompt"}, False),
        ("oracle: request + store + recycle", {"request", "store", "recycle"}, False),
    ]
    present = [s for s in SUBTASKS if any(t["subtask"] == s for t in turns)]
    print("\nSpec-Bench speedup (total time, the baseline's prefill kept) / decode speedup:\n")
    print("| sources | " + " | ".join(present) + " | overall |")
    print("|---" * (len(present) + 2) + "|")
    for name, sources, top1 in rows:
        per = oracle(turns, cost, sources, top1)
        cells, new_total, old_total = [], 0.0, 0.0
        for s in present:
            tokens, rel, wall, prefill = per[s]
            decode = wall - prefill
            new = prefill + decode * rel / tokens  # a step of relative cost 1 is a baseline token
            cells.append(f"{wall / new:.2f}x / {tokens / rel:.2f}x")
            new_total += new
            old_total += wall
        print(f"| {name} | " + " | ".join(cells) + f" | {old_total / new_total:.2f}x |")


if __name__ == "__main__":
    main()
