"""``specdecode bench`` end to end on the real tiny stories260K model (no chat template)."""

from __future__ import annotations

import io
import json
import struct
import sys

import pytest
from typer.testing import CliRunner

from specdecode import InvalidArgument
from specdecode.bench import BenchConfig, parse_methods, run_bench
from specdecode.bench.answers import answer_path, read_answers
from specdecode.bench.questions import SUBTASKS, default_questions_path, load_questions, select
from specdecode.bench.worker import BenchWorker
from specdecode.cli import app

ALL_METHODS = "vanilla,pld,sps,hf-vanilla,hf-pld,hf-assisted"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def questions(per_subtask=1, subtasks=SUBTASKS):
    return select(load_questions(default_questions_path()), list(subtasks), per_subtask)


def config(stories_path, methods=ALL_METHODS, **kw):
    return BenchConfig(
        model=str(stories_path), methods=parse_methods(methods), draft_model=str(stories_path),
        max_new_tokens=kw.pop("max_new_tokens", 12), threads=1, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, stories_path):
    out = tmp_path_factory.mktemp("bench") / "out"
    table = io.StringIO()
    qs = questions()
    outcome = run_bench(config(stories_path), qs, out, progress=False, file=table)
    return out, outcome, qs, table.getvalue()


def test_every_method_answers_every_question_with_spec_bench_files(full_run):
    out, outcome, qs, _ = full_run
    assert not outcome.interrupted and outcome.answered == 6 * len(qs) and outcome.resumed == 0
    for method in ALL_METHODS.split(","):
        rows = read_answers(answer_path(out, 1, method))
        assert [r["question_id"] for r in rows] == sorted(q.question_id for q in qs)
        for r, q in zip(rows, sorted(qs, key=lambda q: q.question_id)):
            c = r["choices"][0]
            assert r["category"] == q.category and r["method"] == method
            assert r["model_id"] == f"stories260k-{method}-float32-temp-0.0"
            assert len(c["turns"]) == len(c["new_tokens"]) == len(c["wall_time"]) == len(q.turns)
            assert all(0 < n <= 12 for n in c["new_tokens"]) and all(t > 0 for t in c["wall_time"])
            # one accept length per decoding step, and together they are the new tokens
            assert len(c["accept_lengths"]) == sum(c["decoding_steps"])
            assert sum(c["accept_lengths"]) == sum(c["new_tokens"])
            assert [len(t) for t in c["token_ids"]] == c["new_tokens"]


def test_greedy_methods_match_the_baseline_exactly(full_run):
    out, outcome, _, _ = full_run
    summary = outcome.summary
    assert summary["baseline"] == "hf-vanilla"
    for method in ALL_METHODS.split(","):
        for subtask in [*SUBTASKS, "overall"]:
            assert summary["results"][method][subtask]["exact_match"] == 1.0, (method, subtask)
    overall = summary["results"]
    assert overall["hf-vanilla"]["overall"]["speedup"] == pytest.approx(1.0)
    assert overall["vanilla"]["overall"]["mean_accepted_tokens"] == 1.0
    assert overall["hf-vanilla"]["overall"]["mean_accepted_tokens"] == 1.0
    # the draft is the target itself: every drafted token is accepted
    assert overall["sps"]["overall"]["acceptance_rate"] == 1.0
    assert overall["hf-assisted"]["overall"]["acceptance_rate"] == 1.0
    # (a draft model as costly as the target rarely pays, so payoff sizing drafts little; it drafts)
    assert overall["sps"]["overall"]["mean_accepted_tokens"] > 1
    assert all(v > 0 for v in summary["peak_memory_bytes"].values())


def test_the_second_turn_sees_the_first_answer(full_run, stories_path):
    out, _, qs, _ = full_run
    [mt] = [q for q in qs if q.subtask == "mt_bench"]
    [row] = [r for r in read_answers(answer_path(out, 1, "vanilla")) if r["question_id"] == mt.question_id]
    first, second = row["choices"][0]["turns"]
    # no chat template: the prompt of turn 2 is turn 1, its answer and turn 2, joined as text
    worker_prompt = "\n\n".join([mt.turns[0], first, mt.turns[1]])
    from specdecode import Engine

    engine = Engine.from_pretrained(stories_path, progress=False)
    again = engine.generate(worker_prompt, max_new_tokens=12)
    assert again.token_ids == row["choices"][0]["token_ids"][1]


def test_table_report_and_plots(full_run):
    out, _, _, table = full_run
    for text in ("speedup", "tokens/s", "mean accepted", "exact match", "overall", "hf-assisted", "100%"):
        assert text in table
    assert (out / "report.md").read_text().startswith("# Spec-Bench report: stories260k")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model"] == "stories260k" and summary["summary"]["runs"] == [1]
    for name in ("speedup.png", "accept_lengths.png"):
        w, h = png_size(out / name)
        assert w >= 400 and h >= 300 and (out / name).stat().st_size > 5000


def test_cli_bench_prints_the_table(tmp_path, stories_path):
    out = tmp_path / "cli"
    args = ["bench", "--model", str(stories_path), "--methods", "vanilla,pld,hf-vanilla", "--subtasks", "qa,rag",
            "--max-new-tokens", "8", "--threads", "1", "--out", str(out), "--no-progress", "-O", "pld.max_ngram=2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Spec-Bench: stories260k, speedup over hf-vanilla" in result.output
    assert "rag" in result.output and "mt_bench" not in result.output
    assert read_answers(answer_path(out, 1, "pld"))[0]["config"]["options"] == {"max_ngram": 2}
    png_size(out / "speedup.png")
    # a second identical call resumes: nothing left to answer, the report is rebuilt
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert len(read_answers(answer_path(out, 1, "pld"))) == 2


def test_interrupted_run_resumes_without_duplicates_or_gaps(tmp_path, stories_path, monkeypatch):
    out = tmp_path / "resume"
    qs = questions(subtasks=["mt_bench", "translation", "qa", "rag"])
    cfg = config(stories_path, "vanilla,hf-vanilla")
    real = BenchWorker.answer
    calls = {"n": 0}

    def answer_then_ctrl_c(self, question, method):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(self, question, method)

    monkeypatch.setattr(BenchWorker, "answer", answer_then_ctrl_c)
    table = io.StringIO()
    first = run_bench(cfg, qs, out, runs=2, progress=False, file=table)
    assert first.interrupted and first.answered == 5
    assert first.summary is not None and "overall" in table.getvalue()  # the summary of what was done
    before = {m: read_answers(answer_path(out, 1, m)) for m in ("vanilla", "hf-vanilla")}
    assert sum(len(v) for v in before.values()) == 5
    with open(answer_path(out, 1, "vanilla"), "a") as f:  # a line cut by the interruption
        f.write('{"question_id": 99, "category": "q')
    monkeypatch.setattr(BenchWorker, "answer", real)
    second = run_bench(cfg, qs, out, runs=2, progress=False, file=io.StringIO())
    assert not second.interrupted and second.resumed == 5 and second.answered == 2 * 2 * len(qs) - 5
    ids = sorted(q.question_id for q in qs)
    for run in (1, 2):
        for method in ("vanilla", "hf-vanilla"):
            assert [r["question_id"] for r in read_answers(answer_path(out, run, method))] == ids
    for method, rows in before.items():  # earlier answers kept as they were
        kept = {r["question_id"]: r["answer_id"] for r in read_answers(answer_path(out, 1, method))}
        assert all(kept[r["question_id"]] == r["answer_id"] for r in rows)
    assert second.summary["runs"] == [1, 2]
    assert second.summary["results"]["vanilla"]["overall"]["tokens_per_second_std"] is not None


def test_sampling_runs_every_method_and_claims_no_exact_match(tmp_path, stories_path):
    out = tmp_path / "sampled"
    cfg = config(stories_path, "vanilla,pld,hf-vanilla", temperature=0.8, max_new_tokens=6)
    done = run_bench(cfg, questions(subtasks=["qa"]), out, progress=False, file=io.StringIO())
    assert {read_answers(answer_path(out, 1, m))[0]["config"]["temperature"] for m in ("vanilla", "hf-vanilla")} == {0.8}
    assert all(done.summary["results"][m]["overall"]["exact_match"] is None for m in ("vanilla", "pld", "hf-vanilla"))


def test_resume_refuses_answers_of_another_model(tmp_path, stories_path):
    out = tmp_path / "other"
    path = answer_path(out, 1, "vanilla")
    path.parent.mkdir(parents=True)
    row = {"question_id": 10, "category": "qa", "answer_id": "x", "model_id": "m", "tstamp": 0.0,
           "choices": [{"index": 0, "turns": ["a"], "decoding_steps": [1], "new_tokens": [1], "wall_time": [0.1],
                        "accept_lengths": [1]}],
           "config": {"model": "qwen2.5-coder-1.5b", "method": "vanilla"}}  # fmt: skip
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(InvalidArgument, match="holds answers of model 'qwen2.5-coder-1.5b', not 'stories260k'"):
        run_bench(config(stories_path, "vanilla"), questions(subtasks=["qa"]), out, progress=False)
    # --overwrite starts again instead
    done = run_bench(config(stories_path, "vanilla", max_new_tokens=4), questions(subtasks=["qa"]), out,
                     overwrite=True, progress=False, file=io.StringIO())  # fmt: skip
    assert [r["config"]["model"] for r in read_answers(path)] == ["stories260k"] and done.answered == 1


def _cli(*args):
    return CliRunner().invoke(app, ["bench", *args, "--no-progress"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--questions", "/nonexistent/q.jsonl"], "no question file"),
        (["--subtasks", "qa,poetry"], "unknown subtask 'poetry'"),
        (["--methods", "vanilla,turbo"], "unknown method 'turbo'"),
        (["--methods", "vanilla,sps"], "needs --draft-model"),
        (["--methods", "vanilla,pld", "--baseline", "hf-vanilla"], "'hf-vanilla' is not among the methods"),
        (["-O", "pld.bogus=1"], "method 'pld'"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
        (["--warmup", "-1"], "warmup: expected an integer >= 0"),
        (["--runs", "0"], "runs: expected a positive integer"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, stories_path, args, message):
    base = ["--model", str(stories_path), "--out", str(tmp_path / "o"), "--max-new-tokens", "2", "--subtasks", "qa"]
    result = _cli(*base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_malformed_question_file_error_names_the_line(tmp_path, stories_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "category": "qa", "turns": ["x"]}\n{"question_id": 2, "category": \n')
    result = _cli("--model", str(stories_path), "--questions", str(q), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and f"{q}, line 2: not valid JSON" in result.output


def test_a_prompt_longer_than_the_context_is_skipped_and_reported(tmp_path, stories_path):
    """Spec-Bench's long summarization/rag prompts exceed a small model's context: the run goes
    on without them, says so, and every method answers the same questions."""
    q = tmp_path / "q.jsonl"
    q.write_text(
        json.dumps({"question_id": 7, "category": "qa", "turns": ["Once upon a time " * 200]}) + "\n"
        + json.dumps({"question_id": 8, "category": "qa", "turns": ["Once upon a time"]}) + "\n"
    )  # fmt: skip
    out = tmp_path / "o"
    result = _cli("--model", str(stories_path), "--questions", str(q), "--out", str(out), "--max-new-tokens", "4",
                  "--methods", "vanilla,pld", "--per-subtask", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "skipping question 7 (qa): turn 1: it has" in result.output
    assert "1 question(s) skipped, longer than the model's context: 7 (qa)" in result.output
    assert "1 question(s) skipped" in (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert [r["question_id"] for r in summary["skipped"]] == [7]
    for method in ("vanilla", "pld"):
        lines = (out / "answers" / "run-1" / f"{method}.jsonl").read_text().splitlines()
        assert [json.loads(line)["question_id"] for line in lines] == [8]


def test_workers_without_ray_name_the_extra(tmp_path, stories_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    result = _cli("--model", str(stories_path), "--workers", "2", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "pip install 'specdecode[ray]'" in result.output
    assert not (tmp_path / "o" / "answers").exists()
