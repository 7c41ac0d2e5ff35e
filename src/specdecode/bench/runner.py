"""The benchmark run: plan what is left to answer, answer it (here or on Ray workers), then
report. Resumable: answers already in the output folder are kept and not asked again.

Order: run by run, question by question, and within a question every method, so that drift of
the machine (heat, other load) hits all methods alike. The method that goes first rotates from
one question to the next.
"""

from __future__ import annotations

import sys

from tqdm import tqdm
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..errors import InvalidArgument
from ..checks import integer
from ..hub import resolve_model
from .answers import answer_path, append_answer, check_resumable, merge_shards, read_answers, write_answers
from .methods import default_baseline
from .questions import Question
from .report import build_report
from .worker import BenchConfig, BenchWorker, QuestionSkipped

Item = tuple[int, Question, list[str]]


@dataclass
class BenchOutcome:
    summary: dict[str, Any] | None
    interrupted: bool
    answered: int  # (question, method) answers produced by this call
    resumed: int  # answers found in the output folder and kept


def plan(config: BenchConfig, questions: list[Question], out: Path, runs: int, overwrite: bool) -> tuple[list[Item], int]:
    """The (run, question, methods) still to answer, and how many answers are already done.

    Leftover worker shards of an interrupted sharded run are merged first; files written for
    another model or other settings are refused (or, with ``overwrite``, removed).
    """
    items: list[Item] = []
    done_count = 0
    for run in range(1, runs + 1):
        done: dict[str, set[int]] = {}
        for spec in config.methods:
            path = answer_path(out, run, spec.name)
            if overwrite:
                path.unlink(missing_ok=True)
                for shard in path.parent.glob(f"shards/{spec.name}.worker-*.jsonl"):
                    shard.unlink()
            records = merge_shards(out, run, spec.name)
            check_resumable(records, config.record_config(spec), path)
            done[spec.name] = {r["question_id"] for r in records}
        for q in questions:
            missing = [s.name for s in config.methods if q.question_id not in done[s.name]]
            done_count += len(config.methods) - len(missing)
            if missing:
                items.append((run, q, missing))
    return items, done_count


def _rotate(methods: list[str], k: int) -> list[str]:
    k %= len(methods)
    return methods[k:] + methods[:k]


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="bench", unit="answer", disable=not enabled or total == 0, dynamic_ncols=True)


def _check(config: BenchConfig, names: list[str], baseline: str, runs: int, workers: int) -> None:
    if baseline not in names:
        raise InvalidArgument("baseline", f"{baseline!r} is not among the methods ({', '.join(names)})")
    for name, value in (("runs", runs), ("workers", workers), ("max_new_tokens", config.max_new_tokens)):
        integer(name, value)
    integer("warmup", config.warmup, 0)
    if config.temperature < 0:
        raise InvalidArgument("temperature", f"expected >= 0, got {config.temperature!r}")
    missing_draft = [s.name for s in config.methods if s.needs_draft_model and not config.draft_model]
    if missing_draft:
        raise InvalidArgument("draft_model", f"method {missing_draft[0]!r} needs --draft-model")
    if workers > 1:
        from .scale import import_ray

        import_ray()  # fail now, with the name of the extra, not after the models are loaded


def _resolve_models(config: BenchConfig, progress: bool) -> BenchConfig:
    """Resolve (and pull) the models once, here: a bad name fails before any work starts, and
    Ray workers, which may start in another directory, get absolute paths."""
    resolved = {"model": str(resolve_model(str(config.model), progress=progress).absolute())}
    if config.draft_model:
        resolved["draft_model"] = str(resolve_model(str(config.draft_model), progress=progress).absolute())
    return BenchConfig(**{**config.__dict__, **resolved})


def run_bench(
    config: BenchConfig,
    questions: list[Question],
    out: str | Path,
    *,
    runs: int = 1,
    baseline: str | None = None,
    workers: int = 1,
    ray_address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    plots: bool = True,
    file: TextIO | None = None,
) -> BenchOutcome:
    """Answer ``questions`` with every method of ``config``; write answers and the report to ``out``.

    Ctrl-C stops the run; what was answered is kept and summarized (``interrupted`` is set).
    """
    names = [s.name for s in config.methods]
    baseline = baseline or default_baseline(names)
    _check(config, names, baseline, runs, workers)
    config = _resolve_models(config, progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items, resumed = plan(config, questions, out, runs, overwrite)
    if resumed and progress:
        print(f"resuming: {resumed} answer(s) already in {out}", file=sys.stderr)

    total = sum(len(ms) for _, _, ms in items)
    bar = None  # started once the models are loaded and warm, so that its ETA is about answers
    answered = 0
    interrupted = False
    info: dict[str, Any] = {}

    def start_bar() -> None:
        nonlocal bar
        bar = _progress_bar(total, progress)

    skipped: dict[int, dict] = {}  # question_id -> why it was not asked

    def on_answer(record: dict, methods: int = 1) -> None:
        nonlocal answered
        if record.get("skipped"):
            if record["question_id"] not in skipped:
                skipped[record["question_id"]] = record
                tqdm.write(f"warning: skipping question {record['question_id']} ({record['category']}): "
                           f"{record['reason']}", file=sys.stderr)  # fmt: skip
            bar.update(record.get("methods", methods))
            return
        answered += 1
        bar.update(1)

    try:
        if items and progress:
            print(f"loading {config.model_name} for {len(names)} method(s), then warming up", file=sys.stderr)
        if items and workers == 1:
            worker = BenchWorker(config, progress=progress)
            info = worker.info()
            worker.warm_up([q for _, q, _ in items[:10]])
            start_bar()
            for k, (run, question, methods) in enumerate(items):
                for i, method in enumerate(_rotate(methods, k)):
                    try:
                        record = worker.answer(question, method)
                    except QuestionSkipped as e:  # every method skips it: they answer the same set
                        on_answer(e.record(), methods=len(methods) - i)
                        break
                    append_answer(answer_path(out, run, method), record)
                    on_answer(record)
        elif items:
            from .scale import run_sharded

            items = [(run, q, _rotate(ms, k)) for k, (run, q, ms) in enumerate(items)]
            info = run_sharded(
                config, items, out, workers=workers, ray_address=ray_address, warm_up_with=[q for _, q, _ in items[:10]],
                on_ready=start_bar, on_answer=on_answer,
            )  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what was done (run the same command again to resume)", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
        for run in range(1, runs + 1):  # merge shards; leave each file sorted, one line per question
            for name in names:
                records = merge_shards(out, run, name)
                if records:
                    write_answers(answer_path(out, run, name), records)

    if not any(read_answers(answer_path(out, r, baseline)) for r in range(1, runs + 1)):
        print(f"no answers of the baseline {baseline!r} yet: nothing to report", file=file or sys.stdout)
        return BenchOutcome(None, interrupted, answered, resumed)
    meta = {
        "config": {k: v for k, v in config.record_config(config.methods[0]).items() if k not in ("method", "options")},
        "options": {s.name: s.options for s in config.methods},
        "draft_model": config.draft_model,
        "interrupted": interrupted,
        "workers": workers,
        "skipped": sorted(skipped.values(), key=lambda r: r["question_id"]),
        **info,
    }
    asked = {q.question_id for q in questions}
    summary = build_report(
        out, baseline=baseline, methods=names, question_ids=asked, runs=runs, meta=meta, file=file, plots=plots
    )
    return BenchOutcome(summary, interrupted, answered, resumed)
