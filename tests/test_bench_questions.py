"""Question files, subtasks and method lists of ``specdecode bench``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from specdecode import InvalidArgument
from specdecode.bench.conversation import Conversation
from specdecode.bench.methods import default_baseline, parse_methods
from specdecode.bench.questions import (
    MT_BENCH_CATEGORIES,
    SUBTASKS,
    default_questions_path,
    load_questions,
    parse_subtasks,
    select,
)

SPEC_BENCH = Path(os.environ.get("SPEC_BENCH_QUESTIONS", Path(__file__).resolve().parents[2] / "shared/data/spec_bench/question.jsonl"))


def write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_default_suite_covers_every_subtask():
    questions = load_questions(default_questions_path())
    by_subtask = {s: [q for q in questions if q.subtask == s] for s in SUBTASKS}
    assert all(len(v) >= 3 for v in by_subtask.values()), {s: len(v) for s, v in by_subtask.items()}
    assert all(len(q.turns) == 2 for q in by_subtask["mt_bench"])  # MT-bench questions are two-turn
    assert len({q.question_id for q in questions}) == len(questions)


@pytest.mark.skipif(not SPEC_BENCH.exists(), reason=f"Spec-Bench questions not at {SPEC_BENCH}")
def test_spec_bench_file_groups_into_six_subtasks_of_80():
    questions = load_questions(SPEC_BENCH)
    assert len(questions) == 480
    assert {s: sum(q.subtask == s for q in questions) for s in SUBTASKS} == dict.fromkeys(SUBTASKS, 80)
    picked = select(questions, ["mt_bench", "rag"], 3)
    assert [q.subtask for q in picked].count("rag") == 3
    # MT-bench's share mixes its categories instead of taking three 'writing' questions
    assert len({q.category for q in picked if q.subtask == "mt_bench"}) == 3


def test_select_subsets(tmp_path):
    rows = [{"question_id": i, "category": c, "turns": [f"q{i}"]} for i, c in
            enumerate(["writing", "writing", "coding", "qa", "qa", "qa"], 1)]  # fmt: skip
    qs = load_questions(write(tmp_path / "q.jsonl", rows))
    assert [q.question_id for q in select(qs, ["qa"], 2)] == [4, 5]
    assert [q.question_id for q in select(qs, ["mt_bench"], 2)] == [1, 3]  # round-robin over categories
    assert [q.question_id for q in select(qs, list(SUBTASKS), 0)] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(InvalidArgument, match="no questions in rag"):
        select(qs, ["rag"], 1)
    assert [q.question_id for q in select(qs, ["qa", "mt_bench"], 1, offset=1)] == [3, 5]  # held out
    with pytest.raises(InvalidArgument, match="no questions in qa after the first 3 of each"):
        select(qs, ["qa"], 1, offset=3)
    with pytest.raises(InvalidArgument, match="offset"):
        select(qs, ["qa"], 1, offset=-1)


def test_parse_subtasks():
    assert parse_subtasks("all") == list(SUBTASKS)
    assert parse_subtasks("rag, qa") == ["qa", "rag"]  # Spec-Bench's order
    with pytest.raises(InvalidArgument, match="unknown subtask 'poetry'"):
        parse_subtasks("qa,poetry")


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"question_id": 1, "category": "qa", "turns": ["x"]', "line 2: not valid JSON"),
        ('{"question_id": "one", "category": "qa", "turns": ["x"]}', "line 2: 'question_id' must be an integer"),
        ('{"question_id": 2, "category": "poetry", "turns": ["x"]}', "line 2: 'category' must be one of"),
        ('{"question_id": 2, "category": "qa", "turns": []}', "line 2: 'turns' must be"),
        ('{"question_id": 1, "category": "qa", "turns": ["x"]}', "line 2: question_id 1 already used on line 1"),
        ("[1, 2]", "line 2: expected a JSON object"),
    ],
)
def test_malformed_question_file_names_the_line(tmp_path, bad, message):
    path = write(tmp_path / "q.jsonl", [{"question_id": 1, "category": "qa", "turns": ["x"]}, bad])
    with pytest.raises(InvalidArgument, match=message):
        load_questions(path)


def test_missing_or_empty_question_file(tmp_path):
    with pytest.raises(InvalidArgument, match="no question file"):
        load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(InvalidArgument, match="holds no questions"):
        load_questions(write(tmp_path / "empty.jsonl", [""]))


def test_parse_methods_and_options():
    specs = parse_methods("vanilla,pld,hf-pld,hf-vanilla", ["pld.max_ngram=4", "hf-pld.prompt_lookup_num_tokens=5"])
    assert [s.name for s in specs] == ["vanilla", "pld", "hf-pld", "hf-vanilla"]
    assert specs[1].options == {"max_ngram": 4} and specs[2].options == {"prompt_lookup_num_tokens": 5}
    assert [s.is_peer for s in specs] == [False, False, True, True]
    assert parse_methods("sps,hf-assisted")[0].needs_draft_model and parse_methods("hf-assisted")[0].needs_draft_model
    from specdecode.drafters import METHODS

    assert [s.name for s in parse_methods("ours,hf-vanilla")] == [*METHODS, "hf-vanilla"]
    assert [s.name for s in parse_methods("all")] == [*METHODS, "hf-vanilla", "hf-pld", "hf-assisted"]
    assert default_baseline(["pld", "vanilla", "hf-vanilla"]) == "hf-vanilla"
    assert default_baseline(["pld", "vanilla"]) == "vanilla"
    for methods, options, message in [
        ("vanilla,magic", [], "unknown method 'magic'"),
        ("pld,pld", [], "listed twice"),
        ("", [], "at least one method"),
        ("pld", ["sps.draft_length=3"], "not among --methods"),
        ("pld", ["pld_max_ngram=3"], "method.key=value"),
        ("hf-pld", ["hf-pld.temperature=3"], "no option 'temperature'"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            parse_methods(methods, options)


class _Tok:
    def __init__(self, template):
        self.chat_template = template


def test_conversation_turns_see_earlier_answers():
    chat = Conversation(_Tok("{{ messages }}"))
    assert chat.ask("hi") == [{"role": "user", "content": "hi"}]
    chat.answer("hello")
    assert chat.ask("more")[-2:] == [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    plain = Conversation(_Tok(None))
    assert plain.ask("Tell a story.") == "Tell a story."
    plain.answer("Once upon a time.")
    assert plain.ask("Make it shorter.") == "Tell a story.\n\nOnce upon a time.\n\nMake it shorter."


def test_mt_bench_categories_are_spec_bench_s():
    assert MT_BENCH_CATEGORIES == ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
