"""The Python API around the loop: prompt lookup's choice, stop strings, streaming, stats."""

from __future__ import annotations

import pytest

from specdecode import Engine, SamplingParams
from specdecode.drafters import PromptLookupDrafter

GREEDY = SamplingParams()


def test_prompt_lookup_prefers_longest_then_most_recent():
    d = PromptLookupDrafter(max_ngram=3)
    #        0  1  2  3  4  5  6  7  8  9 10 11
    toks = [1, 2, 3, 9, 5, 2, 3, 8, 7, 1, 2, 3]
    # The 3-gram (1 2 3) occurs at 0: its continuation (9 5 ...) wins over the more recent
    # 2-gram (2 3) at 5 that continues with 8.
    assert d.propose(toks, 3, GREEDY, None).tokens == [9, 5, 2]
    d.begin([])
    toks = [4, 2, 3, 7, 0, 2, 3, 8, 6, 2, 3]
    # Only 2-grams match; the most recent occurrence (at 5) wins.
    assert d.propose(toks, 2, GREEDY, None).tokens == [8, 6]
    d.begin([])
    assert d.propose([1, 2, 3, 4], 5, GREEDY, None).tokens == []
    # Incremental: the index follows the growing sequence.
    d.begin([])
    toks = [5, 6, 7]
    assert d.propose(toks, 2, GREEDY, None).tokens == []
    toks += [5, 6]
    assert d.propose(toks, 2, GREEDY, None).tokens == [7, 5]


def test_stop_strings_cut_text_and_tokens(stories_path):
    engine = Engine.from_pretrained(stories_path, "pld", progress=False)
    full = engine.generate("Once upon a time", max_new_tokens=60)
    cut_at = full.text.index("Lily")
    got = engine.generate("Once upon a time", max_new_tokens=60, stop=["Lily", "zzz"])
    assert got.text == full.text[:cut_at]
    assert got.finish_reason == "stop"
    assert got.token_ids == full.token_ids[: len(got.token_ids)]
    assert "Lily" in engine.tokenizer.decode(got.token_ids)
    assert "Lily" not in engine.tokenizer.decode(got.token_ids[:-1])


@pytest.mark.parametrize("method", ["vanilla", "pld"])
def test_stream_pieces_join_to_the_text(stories_path, method):
    engine = Engine.from_pretrained(stories_path, method, progress=False)
    for stop in (None, ["park"]):
        stream = engine.stream("Once upon a time", max_new_tokens=80, stop=stop)
        pieces = list(stream)
        assert len(pieces) > 3
        assert "".join(pieces) == stream.result.text
        assert stream.result.text == engine.generate("Once upon a time", max_new_tokens=80, stop=stop).text


def test_stream_can_be_abandoned(stories_path):
    engine = Engine.from_pretrained(stories_path, progress=False)
    stream = engine.stream("Once upon a time", max_new_tokens=100)
    next(stream)
    stream.close()
    assert stream.result is None
    assert engine.generate("Once upon a time", max_new_tokens=5).finish_reason == "length"


def test_stats_add_up(stories_path):
    r = Engine.from_pretrained(stories_path, "pld", progress=False).generate(
        "The dog ran. The dog ran. The dog ran.", max_new_tokens=50
    )
    s = r.stats
    assert s.new_tokens == len(r.token_ids) == sum(s.accept_lengths)
    assert s.target_forwards == len(s.accept_lengths)
    assert s.accepted_draft_tokens == s.new_tokens - s.target_forwards
    assert s.mean_accepted_tokens == pytest.approx(s.new_tokens / s.target_forwards)
    assert 0 < s.acceptance_rate <= 1
    assert s.total_time >= s.draft_time + s.verify_time
    d = r.to_dict()
    assert d["stats"]["mean_accepted_tokens"] == s.mean_accepted_tokens


def test_token_id_prompts_and_eos(stories_path):
    engine = Engine.from_pretrained(stories_path, progress=False)
    ids = engine.encode("Once upon a time")
    assert engine.generate(ids, max_new_tokens=30).token_ids == engine.generate("Once upon a time", max_new_tokens=30).token_ids
    assert 2 in engine.eos_ids  # stories260K's </s>


def test_stats_are_the_fold_of_the_step_records():
    from specdecode.decoding import Prefill, Step
    from specdecode.results import GenerationStats

    stats = GenerationStats(prompt_tokens=7)
    for record in (Prefill(0.5), Step((5, 6, 7), 4, 3, 2, 0.25, 0.5), Step((8,), 0, 0, 0, 0.0, 0.25)):
        stats.add(record)
    assert (stats.prefill_time, stats.draft_time, stats.verify_time) == (0.5, 0.25, 0.75)
    assert stats.accept_lengths == [3, 1] and stats.target_forwards == 2
    assert (stats.drafted_tokens, stats.verified_draft_tokens, stats.accepted_draft_tokens) == (4, 3, 2)
    assert stats.plain_steps == 1
    assert stats.new_tokens == 0  # set by whoever knows what was output (stop strings), not folded


def test_the_loop_yields_a_prefill_then_immutable_steps(stories_path):
    import dataclasses

    from specdecode.decoding import Prefill, Request, Step, decode

    engine = Engine.from_pretrained(stories_path, "pld", sizing="fixed", progress=False)
    ids = engine.encode("The dog ran. The dog ran. The dog ran.")
    request = Request(ids, GREEDY, 40, engine.drafter, engine.sizing, engine.eos_ids)
    records = list(decode(engine.target, request, engine.verify))
    assert isinstance(records[0], Prefill) and all(isinstance(r, Step) for r in records[1:])
    steps = records[1:]
    with pytest.raises(dataclasses.FrozenInstanceError):
        steps[0].accepted = 0
    ref = engine.generate(ids, max_new_tokens=40)
    assert [t for s in steps for t in s.tokens] == ref.token_ids
    assert [len(s.tokens) for s in steps] == ref.stats.accept_lengths
    assert sum(s.accepted for s in steps) == ref.stats.accepted_draft_tokens > 0
    assert all(len(s.tokens) == s.accepted + 1 for s in steps[:-1])  # no EOS or limit before the end


def test_output_text_holds_back_a_possible_stop_and_cuts_the_step_at_one():
    from specdecode.text import OutputText

    from .markov_backend import CharTokenizer  # token i reads as chr(97 + i): 0 -> "a"

    out = OutputText(CharTokenizer(), ["cde"], eos_ids={25})
    assert out.add([0, 1]) == ([0, 1], "ab")
    assert out.add([2]) == ([2], "")  # "c" may begin "cde": held back
    assert out.add([3, 4, 5, 6]) == ([3, 4], "")  # "cde" completes at 4; 5 and 6 are never output
    assert out.stopped and out.finish_reason == "stop"
    assert (out.text, out.ids, out.close()) == ("ab", [0, 1, 2, 3, 4], "")

    out = OutputText(CharTokenizer(), [], eos_ids={25})
    assert out.add([7, 25]) == ([7, 25], "hz") and out.finish_reason == "stop" and not out.stopped
    out = OutputText(CharTokenizer(), ["cde"], eos_ids={25})
    assert out.add([2, 3]) == ([2, 3], "") and out.finish_reason == "length"
    assert out.close() == "cd"  # the end: nothing more can complete the stop string
