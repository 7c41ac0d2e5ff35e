"""``specdecode bench --workers 2``: questions sharded over two Ray actors on a local cluster."""

from __future__ import annotations

import io

import pytest

from specdecode.bench import BenchConfig, parse_methods, run_bench
from specdecode.bench.answers import answer_path, read_answers
from specdecode.bench.questions import SUBTASKS, default_questions_path, load_questions, select

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'specdecode[ray]')")

METHODS = ("vanilla", "pld", "hf-vanilla")


def answers(out):
    """{method: {question_id: output tokens per turn}}"""
    return {
        m: {r["question_id"]: r["choices"][0]["token_ids"] for r in read_answers(answer_path(out, 1, m))}
        for m in METHODS
    }


def test_two_ray_workers_give_the_same_answers_as_one(tmp_path, stories_path):
    questions = select(load_questions(default_questions_path()), list(SUBTASKS), 2)
    config = BenchConfig(model=str(stories_path), methods=parse_methods(",".join(METHODS)), max_new_tokens=10, threads=1)
    one = run_bench(config, questions, tmp_path / "one", progress=False, file=io.StringIO())
    two = run_bench(config, questions, tmp_path / "two", workers=2, progress=False, file=io.StringIO())
    assert one.answered == two.answered == len(METHODS) * len(questions)
    single, sharded = answers(tmp_path / "one"), answers(tmp_path / "two")
    assert set(sharded["vanilla"]) == {q.question_id for q in questions}
    assert sharded == single
    # the shards were merged and removed; each file is sorted with one line per question
    assert not (tmp_path / "two" / "answers" / "run-1" / "shards").exists()
    for m in METHODS:
        ids = [r["question_id"] for r in read_answers(answer_path(tmp_path / "two", 1, m))]
        assert ids == sorted(set(ids))
    assert two.summary["results"]["pld"]["overall"]["exact_match"] == 1.0
    assert not ray.is_initialized()  # the local cluster we started is shut down


def test_an_error_in_a_worker_reaches_the_driver_as_ours(tmp_path, stories_path):
    from specdecode import SpecDecodeError

    questions = select(load_questions(default_questions_path()), ["qa"], 2)
    config = BenchConfig(
        model=str(stories_path), methods=parse_methods("vanilla,pld", ["pld.bogus=1"]), max_new_tokens=4, threads=1
    )
    with pytest.raises(SpecDecodeError, match="method 'pld'.*bogus"):
        run_bench(config, questions, tmp_path / "bad", workers=2, progress=False, file=io.StringIO())
    assert not ray.is_initialized()
