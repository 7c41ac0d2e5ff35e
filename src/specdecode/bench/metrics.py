"""Spec-Bench's metrics, computed from answer records.

As in Spec-Bench's ``evaluation/speed.py``:
- a question's speed is sum(new_tokens) / sum(wall_time) over its turns;
- a subtask's tokens/s is the mean of its questions' speeds (overall: of all questions);
- speedup is a method's mean tokens/s over the baseline's, on the same questions;
- mean accepted tokens is the mean over every decoding step of the tokens it emitted;
- with several runs, tokens/s and speedup are the mean over runs (and their standard
  deviation, ddof=1); mean accepted tokens pools the steps of all runs.
One difference: speed.py counts the baseline's tokens by re-tokenizing its answer text; we use
the ``new_tokens`` it recorded, the same count as for every other method.

Added here: exact match, acceptance rate (accepted / drafted tokens) and peak memory. Exact
match is the share of questions whose output tokens, every turn, equal those of a reference
(only meaningful for greedy decoding, so it is None when sampling). The reference is the plain
decoding of the same implementation when it ran (our ``vanilla`` for our methods, ``hf-vanilla``
for the peers), else the baseline; the two plain decodings are compared with the baseline.
That way the column checks that each method is lossless: between two implementations, reduced
precision (bf16) alone can change a greedy token, which says nothing about the method.
``exact_match_baseline`` holds the comparison with the baseline for every method.

Lossy methods (SpecDec verification, ``lossy`` in the summary) are not expected to match;
for them ``token_agreement`` says how far from exact their answers are: the share of the
reference's tokens they reproduced before their first difference (per turn, pooled).

Only questions every method answered in a run count, so that all methods are compared on the
same prompts.
"""

from __future__ import annotations

import statistics
from typing import Any

from .methods import PEERS
from .questions import OVERALL, SUBTASKS, subtask_of

Answers = dict[int, dict[str, list[dict[str, Any]]]]  # run -> method -> answer records


def question_speed(record: dict[str, Any]) -> float:
    choice = record["choices"][0]
    seconds = sum(choice["wall_time"])
    return sum(choice["new_tokens"]) / seconds if seconds > 0 else 0.0


def decode_speed(record: dict[str, Any]) -> float | None:
    """Tokens per second after each turn's first decoding step (prompt excluded, as llama.cpp
    reports decoding); None for records without first-token times."""
    choice = record["choices"][0]
    firsts = choice.get("first_token_time") or []
    if len(firsts) != len(choice["wall_time"]) or any(f is None for f in firsts):
        return None
    accept, tokens, seconds, i = choice["accept_lengths"], 0, 0.0, 0
    for steps, new, wall, first in zip(choice["decoding_steps"], choice["new_tokens"], choice["wall_time"], firsts):
        tokens += new - (accept[i] if steps and i < len(accept) else 0)
        seconds += wall - first
        i += steps
    return tokens / seconds if tokens > 0 and seconds > 0 else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _sampled(records: list[dict[str, Any]]) -> bool:
    return any((r.get("config") or {}).get("temperature", 0) > 0 for r in records)


def _same_tokens(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    ta, tb = a["choices"][0].get("token_ids"), b["choices"][0].get("token_ids")
    if ta is None or tb is None:
        return None
    return ta == tb


def _agreement(a: dict[str, Any], ref: dict[str, Any]) -> tuple[int, int] | None:
    """(tokens of ``ref`` that ``a`` reproduced before their first difference, tokens of ``ref``)."""
    ta, tr = a["choices"][0].get("token_ids"), ref["choices"][0].get("token_ids")
    if ta is None or tr is None:
        return None
    same = total = 0
    for x, y in zip(ta, tr):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        same += n
        total += len(y)
    return same, total


def lossy_rule(records: list[dict[str, Any]]) -> str | None:
    """The lossy acceptance rule the records were made with (from their options), or None."""
    for r in records:
        options = (r.get("config") or {}).get("options") or {}
        if options.get("verify") == "specdec" and options.get("beta", 3) != 1:
            return "specdec " + ", ".join(f"{k}={options[k]}" for k in ("beta", "tau") if k in options)
    return None


def exact_reference(method: str, methods: list[str], baseline: str) -> str:
    """Whose output ``method``'s must equal: its own implementation's plain decoding, else the baseline."""
    plain = "hf-vanilla" if method in PEERS else "vanilla"
    return plain if method != plain and plain in methods else baseline


def summarize(answers: Answers, baseline: str, methods: list[str] | None = None) -> dict[str, Any]:
    """The summary of every method against ``baseline`` on each subtask and overall."""
    present = list(dict.fromkeys(m for by_method in answers.values() for m in by_method))
    methods = [m for m in (methods or present) if m in present]
    if baseline not in present:
        raise ValueError(f"baseline {baseline!r} has no answers (methods with answers: {', '.join(present) or 'none'})")
    if baseline not in methods:
        methods = [baseline, *methods]
    per_run: dict[int, dict[str, dict[int, dict[str, Any]]]] = {}
    incomplete = 0
    for run, by_method in answers.items():
        ids = [{r["question_id"] for r in by_method.get(m, [])} for m in methods]
        common = set.intersection(*ids) if ids else set()
        incomplete += len(set.union(*ids) - common) if ids else 0
        per_run[run] = {
            m: {r["question_id"]: r for r in by_method.get(m, []) if r["question_id"] in common} for m in methods
        }
    groups: dict[str, set[int]] = {}
    for by_method in per_run.values():
        for r in by_method[baseline].values():
            groups.setdefault(subtask_of(r["category"]), set()).add(r["question_id"])
    order = [s for s in SUBTASKS if s in groups] + sorted(s for s in groups if s not in SUBTASKS)
    all_ids = set().union(*groups.values()) if groups else set()
    groups[OVERALL] = all_ids
    order.append(OVERALL)

    results: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for subtask in order:
        ids = groups[subtask]
        for m in methods:
            reference = exact_reference(m, methods, baseline)
            speeds, speedups, accept, drafted, accepted = [], [], [], 0, 0
            decode_speeds: list[float] = []
            verified: int | None = 0
            matches: list[bool] = []
            base_matches: list[bool] = []
            agree = [0, 0]
            questions = 0
            sampled = False
            for by_method in per_run.values():
                mine = [r for q, r in by_method[m].items() if q in ids]
                if not mine:
                    continue
                base = by_method[baseline]
                questions += len(mine)
                sampled = sampled or _sampled(mine) or _sampled(list(base.values()))
                speed = _mean([question_speed(r) for r in mine])
                base_speed = _mean([question_speed(base[r["question_id"]]) for r in mine])
                speeds.append(speed)
                if base_speed:
                    speedups.append(speed / base_speed)
                decode = [decode_speed(r) for r in mine]
                if all(d is not None for d in decode):
                    decode_speeds.append(_mean(decode))
                for r in mine:
                    choice = r["choices"][0]
                    accept.extend(choice["accept_lengths"])
                    drafted += sum(d for d in choice.get("drafted_tokens") or [] if d is not None)
                    accepted += sum(a for a in choice.get("accepted_draft_tokens") or [] if a is not None)
                    checked = choice.get("verified_draft_tokens") or []
                    if verified is not None and checked and all(v is not None for v in checked):
                        verified += sum(checked)
                    else:
                        verified = None  # a method (a peer) that does not cut its drafts
                    for ref, found in ((by_method[reference], matches), (base, base_matches)):
                        same = _same_tokens(r, ref[r["question_id"]])
                        if same is not None:
                            found.append(same)
                    pair = _agreement(r, by_method[reference][r["question_id"]])
                    if pair is not None:
                        agree[0] += pair[0]
                        agree[1] += pair[1]
            if not questions:
                continue
            results[m][subtask] = {
                "questions": questions,
                "tokens_per_second": _mean(speeds),
                "tokens_per_second_std": _std(speeds),
                "decode_tokens_per_second": _mean(decode_speeds),
                "speedup": _mean(speedups),
                "speedup_std": _std(speedups),
                "mean_accepted_tokens": _mean(accept),
                "acceptance_rate": accepted / drafted if drafted else None,
                "drafted_tokens": drafted,
                "verified_draft_tokens": verified,
                "exact_match": None if sampled or not matches else sum(matches) / len(matches),
                "exact_match_reference": reference,
                "exact_match_baseline": None if sampled or not base_matches else sum(base_matches) / len(base_matches),
                "token_agreement": None if sampled or not agree[1] else agree[0] / agree[1],
            }
    peak = {}
    for m in methods:
        values = [
            b for by_method in answers.values() for r in by_method.get(m, [])
            for b in r["choices"][0].get("peak_memory") or [] if b is not None
        ]  # fmt: skip
        peak[m] = max(values) if values else None
    drafter = {}
    for m in methods:
        values = [b for by_method in answers.values() for r in by_method.get(m, [])
                  for b in r["choices"][0].get("drafter_bytes") or [] if b is not None]  # fmt: skip
        drafter[m] = max(values) if values else None
    return {
        "baseline": baseline,
        "runs": sorted(answers),
        "methods": methods,
        "subtasks": order,
        "questions": {s: len(groups[s]) for s in order},
        "incomplete_questions": incomplete,
        "results": results,
        "peak_memory_bytes": peak,
        "drafter_bytes": drafter,
        "lossy": {
            m: rule for m in methods
            if (rule := lossy_rule([r for by_method in answers.values() for r in by_method.get(m, [])]))
        },  # fmt: skip
    }


def accept_length_counts(answers: Answers, methods: list[str]) -> dict[str, dict[int, int]]:
    """How many decoding steps emitted 1, 2, 3, ... tokens, per method (all runs)."""
    counts: dict[str, dict[int, int]] = {m: {} for m in methods}
    for by_method in answers.values():
        for m in methods:
            for r in by_method.get(m, []):
                for n in r["choices"][0]["accept_lengths"]:
                    counts[m][n] = counts[m].get(n, 0) + 1
    return counts
