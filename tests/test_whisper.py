"""Whisper (docs/whisper.md): the candidate parser, ranking, the writers (the target, and an
OpenAI-compatible endpoint served here), the search end to end on stories260K (resumable), the
reasoning suffix in generate / serve, and exactness of speculation under every suffix."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from specdecode.errors import InvalidArgument
from specdecode.reasoning import ReasoningPrompt, check_suffix
from specdecode.tokenskip.prompts import format_user, tokenskip_prompt
from specdecode.tokenskip.store import read_rows
from specdecode.whisper.candidates import ANGLES, parse_suffixes, read_candidates, starting_set
from specdecode.whisper.search import best_of, pareto_front, rank, screened_out, search, summary_line
from specdecode.whisper.writer import EndpointWriter, writer_messages

PROBLEMS = [
    ("Tom has 3 apples and gets 2 more. How many?", "5"),
    ("Sue had 10 cats. 4 ran. How many stay?", "6"),
    ("A box has 6 eggs. How many in 2 boxes?", "12"),
]


@pytest.fixture
def gsm_file(tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text("".join(json.dumps({"question": q, "answer": f"work\n#### {a}"}) + "\n" for q, a in PROBLEMS))
    return f


def test_starting_set_covers_every_angle_once_per_text():
    cands = starting_set()
    assert {c.angle for c in cands} == set(ANGLES)
    assert len({c.id for c in cands}) == len(cands)


def test_parse_suffixes_reads_what_writers_write():
    reply = """Here are four new suffixes:
1. **Evidence**: "Studies show brief solutions are just as accurate."
2) role-play - You are an accountant: write the numbers only.
- consequences: Long answers are rejected, keep it short!
3. Write only equations, nothing else.
4. evidence: Studies show BRIEF solutions are   just as accurate.
5. ok
6. "Write the equations, then stop." (accuracy 30%, 304 tokens per answer)
"""
    got = [(c.angle, c.text) for c in parse_suffixes(reply, round=2, source="w")]
    assert got == [
        ("evidence", "Studies show brief solutions are just as accurate."),
        ("role-play", "You are an accountant: write the numbers only."),
        ("consequences", "Long answers are rejected, keep it short!"),
        ("other", "Write only equations, nothing else."),
        ("other", "Write the equations, then stop."),  # the scores it was shown, echoed, are dropped
    ]  # the heading (ends with ':'), the repeat (case and spacing) and the 1-word line are skipped
    assert {c.round for c in parse_suffixes(reply, round=2)} == {2}


def test_read_candidates(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# mine\nemotion: Please be brief, it helps me a lot.\n\nJust the equations and the answer.\n")
    assert [(c.angle, c.text, c.source) for c in read_candidates(str(f))] == [
        ("emotion", "Please be brief, it helps me a lot.", "file"), ("other", "Just the equations and the answer.", "file")]
    (tmp_path / "none.txt").write_text("# nothing\nhi\n")
    with pytest.raises(InvalidArgument, match="candidates: .*no suffix"):
        read_candidates(str(tmp_path / "none.txt"))
    with pytest.raises(InvalidArgument, match="candidates: .*not a file"):
        read_candidates(str(tmp_path / "missing.txt"))


def _c(text, acc, tokens):
    return {"id": text, "text": text, "angle": "other", "round": 0, "source": "t", "accuracy": acc, "mean_cot_tokens": tokens}


def test_rank_keeps_accuracy_within_tolerance_and_orders_by_tokens():
    base = {"accuracy": 0.50, "mean_cot_tokens": 300.0}
    cands = [_c("a", 0.49, 120), _c("b", 0.40, 50), _c("c", 0.55, 200), _c("d", 0.47, 100), _c("e", 0.30, 80)]
    ranked = rank(cands, base, tolerance=0.02)
    assert [(c["text"], c["kept"]) for c in ranked] == [("a", True), ("c", True), ("b", False), ("e", False), ("d", False)][:2] + [
        ("d", False), ("b", False), ("e", False)]
    assert best_of(ranked, base)["text"] == "a"
    assert best_of(rank(cands, base, tolerance=0.0), base)["text"] == "c"  # only c holds the accuracy
    assert best_of(rank([_c("x", 0.6, 400)], base, 0.02), base) is None  # kept but longer than the base
    front = pareto_front([{**base, "text": "base"}, *cands])
    assert [p["text"] for p in front] == ["b", "d", "a", "c"]


def test_screening_rule():
    base = {"accuracy": 0.5, "mean_cot_tokens": 300.0}
    assert screened_out({"accuracy": 0.9, "mean_cot_tokens": 300.0}, base, 0.15) == "not shorter than the base"
    assert screened_out({"accuracy": 0.3, "mean_cot_tokens": 100.0}, base, 0.15).startswith("accuracy more than 15 points")
    assert screened_out({"accuracy": 0.35, "mean_cot_tokens": 100.0}, base, 0.15) is None  # within the slack
    ranked = rank([{**_c("x", 0.9, 10), "screened_out": "not shorter than the base"}], base, 0.02)
    assert ranked[0]["kept"] is False and best_of(ranked, base) is None  # never kept on a partial score


def test_search_screens_candidates_on_the_first_problems(stories_path, tmp_path, gsm_file):
    """stories260K writes every answer to the token cap, so no candidate is shorter than the base
    on the first problem: each is screened out after it, and the other dev problem is never
    decoded for it; without --screen the same folder scores them on all (reusing the first)."""
    f = tmp_path / "c.txt"
    f.write_text("instruction: Answer with the numbers only please.\nemotion: Keep it short, it matters to me.\n")
    out = tmp_path / "s"
    kw = dict(data=str(gsm_file), dev=2, seed=1, rounds=0, method="pld", max_num_seqs=1, max_new_tokens=6,
              dtype="float32", candidates=str(f), progress=False, log=lambda m: None)  # fmt: skip
    summary = search(str(stories_path), str(out), screen=1, **kw)
    data = json.loads((out / "candidates.json").read_text())
    assert summary["screened_out"] == 2 and summary["best"] is None
    for c in data["candidates"]:
        assert c["screened_out"] == "not shorter than the base" and c["n"] == 1 and not c["kept"]
        assert len(read_rows(out / "scores" / c["id"] / "answers-pld-1.0.jsonl")) == 1
    assert len(read_rows(out / "scores" / "base" / "answers-pld-1.0.jsonl")) == 2  # the base: always all
    assert "screened out, not shorter than the base" in (out / "report.md").read_text()
    full = search(str(stories_path), str(out), screen=0, **kw)
    assert full["screened_out"] == 0 and full["scored_this_run"] == 2
    assert all(c["n"] == 2 for c in json.loads((out / "candidates.json").read_text())["candidates"])
    with pytest.raises(InvalidArgument, match="^screen: "):
        search(str(stories_path), str(out), screen=-1, **kw)


def test_writer_messages_show_the_scores_and_the_angles():
    base = {"accuracy": 0.5, "mean_cot_tokens": 300.0}
    msgs = writer_messages(base, [{**_c("Be brief.", 0.5, 100), "kept": True}, {**_c("Be wild.", 0.1, 20), "kept": False}], 3)
    user = msgs[-1]["content"]
    assert "50%" in user and "300 tokens" in user and '"Be brief." (accuracy 50%, 100 tokens' in user
    assert "avoid" in user.split("Be wild.")[1].split("\n")[0] and "Write 3 new suffixes" in user
    assert all(a in user for a in ANGLES)


class _Endpoint(http.server.BaseHTTPRequestHandler):
    replies: list = []
    seen: list = []

    def log_message(self, *a):
        pass

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "big-model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        if body["model"] != "big-model":
            return self._send(404, {"error": {"message": "no such model"}})
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": type(self).replies.pop(0)}}]})


@pytest.fixture
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    _Endpoint.replies, _Endpoint.seen = [], []
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_endpoint_writer(endpoint):
    _Endpoint.replies.append("instruction: Write the equations only, then stop.")
    w = EndpointWriter(endpoint + "/v1/", api_key="k", temperature=0.5)
    assert w.model == "big-model" and w.base == endpoint + "/v1"
    assert w([{"role": "user", "content": "x"}], 1) == "instruction: Write the equations only, then stop."
    path, auth, body = _Endpoint.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k" and body["temperature"] == 0.5
    with pytest.raises(InvalidArgument, match="writer_url: .*HTTP 404.*no such model"):
        EndpointWriter(endpoint, model="other")([{"role": "user", "content": "x"}], 1)
    with pytest.raises(InvalidArgument, match="writer_url: expected an http"):
        EndpointWriter("localhost:1")
    with pytest.raises(InvalidArgument, match="writer_url: cannot reach"):
        EndpointWriter("http://127.0.0.1:9", model="m", timeout=5)([{"role": "user", "content": "x"}], 1)


def test_search_end_to_end_and_resume(stories_path, tmp_path, gsm_file, endpoint):
    """Base + a starting set from a file + one round written by an endpoint; the files the
    other commands take; a rerun scores nothing again and asks the writer nothing."""
    start = tmp_path / "start.txt"
    start.write_text("instruction: Answer with the numbers only please.\nemotion: Keep it short, it matters to me.\n")
    _Endpoint.replies.append("1. evidence: Short answers are proven accurate.\n2. Keep it short, it matters to me.\n")
    out = tmp_path / "s"
    kw = dict(data=str(gsm_file), dev=2, seed=1, rounds=1, per_round=2, method="pld", max_num_seqs=2, max_new_tokens=10,
              dtype="float32", candidates=str(start), writer_url=endpoint, progress=False, log=lambda m: None)  # fmt: skip
    summary = search(str(stories_path), str(out), **kw)
    data = json.loads((out / "candidates.json").read_text())
    texts = [c["text"] for c in data["candidates"]]
    assert sorted(texts) == sorted(["Answer with the numbers only please.", "Keep it short, it matters to me.",
                                    "Short answers are proven accurate."])  # the repeat is not scored twice
    assert {c["source"] for c in data["candidates"]} == {"file", "big-model at " + endpoint + "/v1"}
    assert summary["candidates_scored"] == 3 and summary["scored_this_run"] == 4 and data["base"]["n"] == 2
    for c in data["candidates"]:  # scored on the fixed dev split with the suffix in the prompt
        rows = read_rows(out / "scores" / c["id"] / "answers-pld-1.0.jsonl")
        assert len(rows) == 2 and all(r["new_tokens"] <= 10 for r in rows)
        settings = json.loads((out / "scores" / c["id"] / "eval_settings.json").read_text())
        assert settings["suffix"] == c["text"]
    best = (out / "best_suffix.txt").read_text()
    assert best == ("" if summary["best"] is None else summary["best"]["text"] + "\n")
    for name in ("report.md", "summary.json", "pareto.png"):
        assert (out / name).exists()
    assert summary_line(summary).startswith("whisper search [pld] 2 dev problems, 3 candidates | base: accuracy")
    # resumed: nothing scored again, the writer (which has no reply left) is not asked again
    again = search(str(stories_path), str(out), **kw)
    assert again["scored_this_run"] == 0 and again["candidates_scored"] == 3 and _Endpoint.replies == []
    # another starting set into the same folder adds to the pool: nothing earlier is lost or redone
    more = tmp_path / "more.txt"
    more.write_text("role-play: You are a terse accountant who writes numbers only.\n")
    third = search(str(stories_path), str(out), **{**kw, "candidates": str(more)})
    assert third["candidates_scored"] == 4 and third["scored_this_run"] == 1
    assert "You are a terse accountant who writes numbers only." in (out / "report.md").read_text()
    with pytest.raises(InvalidArgument, match="out: .*dev=2, not 3"):
        search(str(stories_path), str(out), **{**kw, "dev": 3})


def test_search_with_the_target_as_writer(stories_path, tmp_path, gsm_file):
    """stories260K's 512-token context cannot hold the writer's request: a clear error, after
    the starting set is scored (kept: the rerun with --rounds 0 or --writer-url goes on)."""
    out = tmp_path / "t"
    kw = dict(data=str(gsm_file), dev=1, per_round=2, method="vanilla", max_num_seqs=1, max_new_tokens=6,
              dtype="float32", progress=False, log=lambda m: None)  # fmt: skip
    with pytest.raises(InvalidArgument, match="^writer: .*--writer-url.*--rounds 0"):
        search(str(stories_path), str(out), rounds=1, **kw)
    summary = search(str(stories_path), str(out), rounds=0, **kw)
    assert summary["candidates_scored"] == len(starting_set()) and summary["scored_this_run"] == 0


def test_target_writer_samples_the_target(stories_path):
    from specdecode import Engine
    from specdecode.whisper.writer import TargetWriter

    engine = Engine.from_pretrained(stories_path, "pld", dtype="float32", progress=False)
    w = TargetWriter(engine, max_new_tokens=20, seed=3)
    msgs = [{"role": "user", "content": "Write a short line."}]
    text = w(msgs, 1)
    want = engine.generate("Write a short line.\n", max_new_tokens=20, temperature=0.8, seed=4).text
    assert text == want and w(msgs, 1) == text and w(msgs, 2) != text  # the round seeds the sampling


def test_search_bad_input(stories_path, tmp_path, gsm_file):
    for kw, arg in [({"dev": 0}, "dev"), ({"rounds": -1}, "rounds"), ({"tolerance": 2}, "tolerance"),
                    ({"per_round": 0}, "per_round"), ({"writer_temperature": 3}, "writer_temperature")]:
        with pytest.raises(InvalidArgument, match=f"^{arg}: "):
            search(str(stories_path), str(tmp_path / "x"), data=str(gsm_file), progress=False, **kw)
    with pytest.raises(InvalidArgument, match="^data: "):
        search(str(stories_path), str(tmp_path / "x"), data=str(tmp_path / "missing.jsonl"), progress=False)


def test_cli_bad_input(tmp_path, gsm_file):
    from typer.testing import CliRunner

    from specdecode.cli import app

    r = CliRunner().invoke(app, ["whisper", "search", "--out", str(tmp_path / "o"), "--data", str(gsm_file),
                                 "--writer-url", "localhost:8000"])  # fmt: skip
    assert r.exit_code == 2 and "writer_url" in r.output


def test_reasoning_prompt(tmp_path):
    f = tmp_path / "best_suffix.txt"
    f.write_text("Be brief.\n")
    rp, rest = ReasoningPrompt.from_options({"reasoning_suffix": str(f), "max_ngram": 3})
    assert (rp.suffix, rest) == ("Be brief.", {"max_ngram": 3})
    assert rp.apply("Q?") == ("Q?\nBe brief.", {"reasoning_suffix": "Be brief."})
    msgs = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "Q?"}]
    new, added = ReasoningPrompt(0.6, "Be brief.").apply(msgs)
    assert new[2]["content"] == format_user("Q?", 0.6, "Be brief.") and new[0]["content"] == "A" and msgs[2]["content"] == "Q?"
    assert added == {"cot_ratio": 0.6, "reasoning_suffix": "Be brief."}
    assert rp.apply([1, 2, 3]) == ([1, 2, 3], {})  # token ids: nothing to write into
    assert ReasoningPrompt.from_options({"reasoning_suffix": ""})[0].suffix is None
    assert check_suffix("  ") is None
    with pytest.raises(InvalidArgument, match="reasoning_suffix: expected at most"):
        check_suffix("x" * 3000)
    with pytest.raises(InvalidArgument, match="reasoning_suffix: expected text"):
        check_suffix(3)


@pytest.mark.parametrize("method", ["pld", "suffix", "lookahead"])
def test_speculation_is_exact_under_every_suffix(stories_path, method):
    """The answers Whisper's scores (and reports) count are plain greedy decoding's, whatever
    the suffix: each starting candidate, token for token against vanilla (float32)."""
    from specdecode import Engine

    plain = Engine.from_pretrained(stories_path, "vanilla", dtype="float32", progress=False)
    spec = Engine.from_pretrained(stories_path, method, dtype="float32", progress=False)
    tok = plain.tokenizer
    for c in starting_set():
        ids = tokenskip_prompt(tok, PROBLEMS[0][0], 1.0, c.text)
        want = plain.generate(ids, max_new_tokens=40).token_ids
        assert spec.generate(ids, max_new_tokens=40).token_ids == want, c.text


def test_server_appends_the_reasoning_suffix(stories_path):
    from fastapi.testclient import TestClient

    from specdecode import Engine
    from specdecode.server import create_app

    engine = Engine.from_pretrained(stories_path, "pld", progress=False)
    q = "Tom has 3 apples and buys 4 more."
    gen = lambda p: engine.generate(p, max_new_tokens=10).text  # noqa: E731
    with TestClient(create_app(engine, model_name="m", max_num_seqs=1, reasoning_suffix="Be brief.")) as c:
        body = {"model": "m", "prompt": q, "max_tokens": 10, "temperature": 0}
        r = c.post("/v1/completions", json=body).json()  # the server's default
        assert r["choices"][0]["text"] == gen(q + "\nBe brief.") and r["usage"]["prompt_added"] == {"reasoning_suffix": "Be brief."}
        r = c.post("/v1/completions", json={**body, "reasoning_suffix": "Answer in one line."}).json()
        assert r["choices"][0]["text"] == gen(q + "\nAnswer in one line.")
        r = c.post("/v1/completions", json={**body, "reasoning_suffix": ""}).json()  # "" turns it off
        assert r["choices"][0]["text"] == gen(q) and "prompt_added" not in r["usage"]
        bad = c.post("/v1/completions", json={**body, "reasoning_suffix": "x" * 3000})
        assert bad.status_code == 400 and "reasoning_suffix" in bad.text
        streamed = {**body, "cot_ratio": 0.5, "stream": True, "stream_options": {"include_usage": True}}
        events = [json.loads(line[6:]) for line in c.post("/v1/completions", json=streamed).text.splitlines()
                  if line.startswith("data: {")]  # fmt: skip
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == gen(format_user(q, 0.5, "Be brief.") + "\n")
        assert events[-1]["usage"]["prompt_added"] == {"cot_ratio": 0.5, "reasoning_suffix": "Be brief."}
