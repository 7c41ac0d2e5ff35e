"""Spec-Bench metrics, answer files and the report, on hand-made answers (no model needed)."""

from __future__ import annotations

import json
import math
import struct

import pytest

from specdecode import InvalidArgument
from specdecode.bench.answers import (
    answer_path,
    append_answer,
    check_resumable,
    make_record,
    merge_shards,
    read_answers,
    shard_path,
    write_answers,
)
from specdecode.bench.metrics import question_speed, summarize
from specdecode.bench.questions import Question
from specdecode.bench.report import build_report

CONFIG = {"model": "toy", "options": {}, "max_new_tokens": 32, "temperature": 0.0, "seed": None, "dtype": "auto"}


def turn(new_tokens, wall_time, accept, tokens=None, drafted=None, accepted=None, memory=1 << 20):
    tokens = tokens if tokens is not None else list(range(new_tokens))
    return {
        "text": "x" * new_tokens, "decoding_steps": len(accept), "new_tokens": new_tokens, "wall_time": wall_time,
        "accept_lengths": accept, "token_ids": tokens, "drafted_tokens": drafted, "accepted_draft_tokens": accepted,
        "peak_memory": memory,
    }  # fmt: skip


Q1 = Question(1, "writing", ("a", "b"))  # mt_bench, two turns
Q2 = Question(2, "qa", ("c",))


def record(question, method, turns):
    return make_record(question, method, f"toy-{method}", {**CONFIG, "method": method}, turns)


def hand_made(tmp_path, m_q1_wall=(0.5, 0.5), run=1):
    """Baseline 'base' and method 'fast' on Q1 (2 turns) and Q2."""
    base = [
        record(Q1, "base", [turn(10, 1.0, [1] * 10), turn(20, 1.0, [1] * 20)]),  # 30 / 2.0 = 15 tok/s
        record(Q2, "base", [turn(12, 2.0, [1] * 12)]),  # 6 tok/s
    ]
    fast = [
        record(Q1, "fast", [turn(10, m_q1_wall[0], [3, 3, 4], drafted=9, accepted=7),
                            turn(20, m_q1_wall[1], [5, 5, 5, 5], drafted=20, accepted=16)]),  # fmt: skip
        record(Q2, "fast", [turn(12, 1.5, [2, 4, 6], tokens=[7] * 12, drafted=12, accepted=9, memory=3 << 20)]),
    ]
    for method, rows in (("base", base), ("fast", fast)):
        write_answers(answer_path(tmp_path, run, method), rows)
    return {"base": base, "fast": fast}


def test_question_speed_is_sum_tokens_over_sum_time():
    r = record(Q1, "m", [turn(10, 1.0, [1] * 10), turn(20, 3.0, [1] * 20)])
    assert question_speed(r) == pytest.approx(30 / 4.0)


def test_metrics_match_spec_bench_formulas_by_hand(tmp_path):
    answers = {1: hand_made(tmp_path)}
    s = summarize(answers, "base", ["base", "fast"])
    assert s["subtasks"] == ["mt_bench", "qa", "overall"]
    fast, base = s["results"]["fast"], s["results"]["base"]
    # mt_bench: Q1 only. fast 30 tokens / 1.0 s = 30 tok/s; base 15 tok/s.
    assert fast["mt_bench"]["tokens_per_second"] == pytest.approx(30.0)
    assert fast["mt_bench"]["speedup"] == pytest.approx(2.0)
    assert fast["mt_bench"]["mean_accepted_tokens"] == pytest.approx(30 / 7)  # 7 steps over both turns
    assert fast["mt_bench"]["acceptance_rate"] == pytest.approx((7 + 16) / (9 + 20))
    assert fast["mt_bench"]["exact_match"] == 1.0
    # qa: 12 / 1.5 = 8 tok/s vs 6; output tokens differ from the baseline's.
    assert fast["qa"]["speedup"] == pytest.approx(8 / 6)
    assert fast["qa"]["mean_accepted_tokens"] == pytest.approx(4.0)
    assert fast["qa"]["exact_match"] == 0.0
    # overall: mean of question speeds, then the ratio (not the mean of subtask speedups).
    assert fast["overall"]["tokens_per_second"] == pytest.approx((30 + 8) / 2)
    assert base["overall"]["tokens_per_second"] == pytest.approx((15 + 6) / 2)
    assert fast["overall"]["speedup"] == pytest.approx(19 / 10.5)
    assert fast["overall"]["mean_accepted_tokens"] == pytest.approx(42 / 10)
    assert fast["overall"]["exact_match"] == 0.5
    assert fast["overall"]["tokens_per_second_std"] is None  # one run: no spread
    assert base["overall"]["speedup"] == pytest.approx(1.0)
    assert base["overall"]["acceptance_rate"] is None  # nothing drafted
    assert s["peak_memory_bytes"] == {"base": 1 << 20, "fast": 3 << 20}


def test_several_runs_give_mean_and_sample_std(tmp_path):
    answers = {1: hand_made(tmp_path, run=1), 2: hand_made(tmp_path, m_q1_wall=(1.0, 1.0), run=2)}
    cell = summarize(answers, "base")["results"]["fast"]["mt_bench"]
    assert cell["speedup"] == pytest.approx(1.5)  # runs: 2.0 and 1.0
    assert cell["speedup_std"] == pytest.approx(math.sqrt(0.5))  # ddof=1, as Spec-Bench's mean report
    assert cell["tokens_per_second"] == pytest.approx(22.5)
    assert cell["questions"] == 2


def test_only_questions_every_method_answered_count(tmp_path):
    rows = hand_made(tmp_path)
    answers = {1: {"base": rows["base"], "fast": rows["fast"][:1]}}  # fast stopped after Q1
    s = summarize(answers, "base")
    assert s["subtasks"] == ["mt_bench", "overall"]
    assert s["incomplete_questions"] == 1
    assert s["results"]["fast"]["overall"]["speedup"] == pytest.approx(2.0)


def test_exact_match_is_checked_against_the_same_implementation_s_plain_decoding():
    ours, theirs = [1, 2, 3], [1, 2, 4]  # e.g. bf16 kernels of two implementations differ
    rows = {
        m: [record(Q2, m, [turn(3, 1.0, [1, 1, 1], tokens=t)])]
        for m, t in (("vanilla", ours), ("pld", ours), ("hf-vanilla", theirs), ("hf-pld", theirs))
    }
    res = summarize({1: rows}, "hf-vanilla")["results"]
    cells = {m: res[m]["overall"] for m in rows}
    assert {m: c["exact_match_reference"] for m, c in cells.items()} == {
        "vanilla": "hf-vanilla", "pld": "vanilla", "hf-vanilla": "hf-vanilla", "hf-pld": "hf-vanilla"
    }  # fmt: skip
    assert {m: c["exact_match"] for m, c in cells.items()} == {"vanilla": 0.0, "pld": 1.0, "hf-vanilla": 1.0, "hf-pld": 1.0}
    assert cells["pld"]["exact_match_baseline"] == 0.0
    # without our vanilla in the run, our methods are compared with the baseline
    del rows["vanilla"]
    assert summarize({1: rows}, "hf-vanilla")["results"]["pld"]["overall"]["exact_match_reference"] == "hf-vanilla"


def test_exact_match_is_not_claimed_when_sampling(tmp_path):
    rows = hand_made(tmp_path)
    for r in rows["fast"] + rows["base"]:
        r["config"] = {**r["config"], "temperature": 0.7}
    assert summarize({1: rows}, "base")["results"]["fast"]["overall"]["exact_match"] is None


def test_answer_file_round_trip_and_spec_bench_schema(tmp_path):
    path = tmp_path / "a.jsonl"
    r = record(Q1, "fast", [turn(3, 0.1, [2, 1], drafted=4, accepted=1), turn(2, 0.2, [2], drafted=1, accepted=1)])
    append_answer(path, r)
    [back] = read_answers(path)
    assert back == json.loads(json.dumps(r))
    for key in ("question_id", "category", "answer_id", "model_id", "tstamp", "choices"):
        assert key in back
    choice = back["choices"][0]
    assert choice["index"] == 0
    assert choice["turns"] == ["xxx", "xx"] and choice["new_tokens"] == [3, 2] and choice["decoding_steps"] == [2, 1]
    assert choice["wall_time"] == [0.1, 0.2]
    assert choice["accept_lengths"] == [2, 1, 2]  # one entry per decoding step, all turns
    assert len(choice["accept_lengths"]) == sum(choice["decoding_steps"])


def test_cut_last_line_is_dropped_and_repaired_but_a_bad_middle_line_is_an_error(tmp_path):
    path = tmp_path / "a.jsonl"
    append_answer(path, record(Q1, "m", [turn(1, 0.1, [1]), turn(1, 0.1, [1])]))
    with open(path, "a") as f:
        f.write('{"question_id": 2, "categ')  # interrupted mid-write
    assert [r["question_id"] for r in read_answers(path, repair=True)] == [1]
    assert path.read_text().endswith("\n")
    append_answer(path, record(Q2, "m", [turn(1, 0.1, [1])]))
    assert [r["question_id"] for r in read_answers(path)] == [1, 2]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    with pytest.raises(InvalidArgument, match="line 2"):
        read_answers(path)
    path.write_text(json.dumps({"question_id": 1}) + "\n")
    with pytest.raises(InvalidArgument, match="line 1: missing"):
        read_answers(path)


def test_shards_merge_without_duplicates(tmp_path):
    a = record(Q1, "m", [turn(1, 0.1, [1]), turn(1, 0.1, [1])])
    b = record(Q2, "m", [turn(1, 0.1, [1])])
    append_answer(answer_path(tmp_path, 1, "m"), a)
    append_answer(shard_path(tmp_path, 1, "m", 0), b)
    append_answer(shard_path(tmp_path, 1, "m", 1), a)  # a duplicate from a retried question
    merged = merge_shards(tmp_path, 1, "m")
    assert [r["question_id"] for r in merged] == [1, 2]
    assert merged[0]["answer_id"] == a["answer_id"]
    assert not (tmp_path / "answers" / "run-1" / "shards").exists()


def test_resume_refuses_another_model_or_other_settings(tmp_path):
    rows = [record(Q1, "m", [turn(1, 0.1, [1]), turn(1, 0.1, [1])])]
    check_resumable(rows, {**CONFIG, "method": "m"}, tmp_path)  # same settings: fine
    with pytest.raises(InvalidArgument, match="model 'toy', not 'other'"):
        check_resumable(rows, {**CONFIG, "method": "m", "model": "other"}, tmp_path)
    with pytest.raises(InvalidArgument, match="max_new_tokens=32 \\(now 64\\)"):
        check_resumable(rows, {**CONFIG, "method": "m", "max_new_tokens": 64}, tmp_path)
    del rows[0]["config"]
    with pytest.raises(InvalidArgument, match="not written by specdecode bench"):
        check_resumable(rows, {**CONFIG, "method": "m"}, tmp_path)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_rebuilds_table_markdown_json_and_plots(tmp_path, capsys):
    from typer.testing import CliRunner

    from specdecode.cli import app

    hand_made(tmp_path)
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--baseline", "base"])
    assert result.exit_code == 0, result.output
    assert "2.00x" in result.output and "mt_bench" in result.output and "overall" in result.output
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert summary["baseline"] == "base"
    assert summary["results"]["fast"]["qa"]["speedup"] == pytest.approx(8 / 6)
    report = (tmp_path / "report.md").read_text()
    assert "| mt_bench | base |" in report and "speedup.png" in report
    for name in ("speedup.png", "accept_lengths.png"):
        w, h = png_size(tmp_path / name)
        assert w >= 400 and h >= 300
    # the baseline recorded in summary.json is kept when rebuilding without --baseline
    assert CliRunner().invoke(app, ["report", str(tmp_path)]).exit_code == 0
    assert json.loads((tmp_path / "summary.json").read_text())["baseline"] == "base"


def test_plain_text_table_without_rich(tmp_path, monkeypatch):
    import io
    import sys

    from specdecode.bench.report import print_table

    summary = summarize({1: hand_made(tmp_path)}, "base")
    monkeypatch.setitem(sys.modules, "rich.console", None)  # `from rich.console import ...` fails
    buf = io.StringIO()
    print_table(summary, "title", buf)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "title" and lines[1].split()[:3] == ["subtask", "method", "speedup"]
    assert any(line.split()[:3] == ["mt_bench", "base", "1.00x"] for line in lines)
    assert any(line.split()[:2] == ["fast", "2.00x"] for line in lines)
    assert lines[-1].startswith("peak memory")


def test_report_errors(tmp_path):
    with pytest.raises(InvalidArgument, match="no answers"):
        build_report(tmp_path)
    hand_made(tmp_path)
    with pytest.raises(InvalidArgument, match="'nope' has no answers"):
        build_report(tmp_path, baseline="nope", plots=False)


def test_decode_speed_leaves_out_each_turns_prompt_and_first_step():
    from specdecode.bench.metrics import decode_speed

    t1 = {**turn(10, 2.0, [3, 1, 2, 4]), "first_token_time": 1.0}  # 7 tokens after the first step, in 1.0 s
    t2 = {**turn(6, 1.5, [2, 2, 2]), "first_token_time": 0.5}  # 4 tokens in 1.0 s
    assert decode_speed(record(Q1, "fast", [t1, t2])) == pytest.approx(11 / 2.0)
    assert decode_speed(record(Q2, "fast", [turn(5, 1.0, [1] * 5)])) is None  # no first-token time recorded
    answers = {1: {"base": [record(Q1, "base", [t1, t2])]}}
    s = summarize(answers, "base")
    assert s["results"]["base"]["overall"]["decode_tokens_per_second"] == pytest.approx(5.5)
