"""SpecDec verification (lossy, opt-in): beta = 1 is exact greedy; larger beta accepts more; every
output made with it says so (stats, CLI, server, bench report)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from typer.testing import CliRunner

from specdecode import Engine, InvalidArgument
from specdecode.draft import Draft, verify_greedy, verify_specdec

from .test_lossless_greedy import STORY_PROMPTS



@pytest.fixture(autouse=True)
def _grow_shrink_sizing(monkeypatch):
    """These tests assert that drafts are proposed and accepted: size them by the deterministic
    grow/shrink rule, not by payoff (whose timings are noise on a shared test machine)."""
    monkeypatch.setenv("SPECDECODE_SIZING", "adaptive")

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: see test_model_free_drafters.py
    yield
    torch.set_num_threads(before)


def random_tree(g: torch.Generator, vocab: int, n: int) -> Draft:
    parents = [-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, n)]
    return Draft(torch.randint(0, vocab, (n,), generator=g).tolist(), parents)


def test_beta_one_is_exact_greedy_and_more_beta_accepts_more():
    g = torch.Generator().manual_seed(0)
    longer = 0
    for trial in range(300):
        vocab, n = 6, int(torch.randint(1, 10, (1,), generator=g))
        draft = random_tree(g, vocab, n)
        logits = torch.randn(n + 1, vocab, generator=g) * 2
        exact = verify_greedy(draft, logits)
        for tau in (0.0, 1.0, 100.0):
            assert verify_specdec(draft, logits, 1, tau) == exact
        # beta > 1, tau 0: only ties with the best qualify, which random logits never have.
        assert verify_specdec(draft, logits, 3, 0.0) == exact
        path, nxt = verify_specdec(draft, logits, 3, 100.0)
        assert len(path) >= len(exact[0])
        longer += len(path) > len(exact[0])
        # Every accepted node is among its row's top 3; the bonus token is the argmax.
        node = -1
        for c in path:
            assert draft.parents[c] == node
            assert draft.tokens[c] in logits[node + 1].topk(3).indices.tolist()
            node = c
        assert nxt == int(logits[node + 1].argmax())
    assert longer > 30


def test_tau_limits_what_is_accepted():
    logits = torch.tensor([[0.0, -0.5, -3.0, -9.0], [0.0, 0.0, 0.0, 0.0]])
    draft = Draft.chain([2])  # third best, 3 nats below the best
    assert verify_specdec(draft, logits, 3, 1.0) == ([], 0)
    assert verify_specdec(draft, logits, 3, 5.0)[0] == [0]
    assert verify_specdec(draft, logits, 2, 5.0)[0] == []  # not among the top 2
    # Among acceptable siblings the target's favourite wins.
    tree = Draft([2, 1], [-1, -1])
    assert verify_specdec(tree, torch.cat([logits[:1], logits[1:], logits[1:]]), 3, 5.0)[0] == [1]


def test_engine_beta_one_equals_plain_greedy_and_beta_three_is_marked_lossy(stories_path):
    base = Engine.from_pretrained(stories_path, progress=False)
    exact = base.with_method("pld")
    same = base.with_method("pld", verify="specdec", beta=1, tau=0.0)
    loose = base.with_method("pld", verify="specdec", beta=3, tau=2.0)
    vanilla = base.with_method("vanilla")
    steps_exact = steps_loose = 0
    differs = 0
    for prompt in STORY_PROMPTS:
        ref = vanilla.generate(prompt, max_new_tokens=60)
        a, b, c = (e.generate(prompt, max_new_tokens=60) for e in (exact, same, loose))
        assert a.token_ids == b.token_ids == ref.token_ids
        assert not a.stats.lossy and not b.stats.lossy and a.stats.verify == "exact"
        assert c.stats.lossy and c.stats.verify == "specdec(beta=3, tau=2)"
        assert c.to_dict()["stats"]["lossy"] is True
        steps_exact += a.stats.target_forwards
        steps_loose += c.stats.target_forwards
        differs += c.token_ids != ref.token_ids
    assert steps_loose < steps_exact  # it accepts more
    assert differs > 0  # and it is lossy: some answers changed
    with pytest.raises(InvalidArgument) as e:
        loose.generate(STORY_PROMPTS[0], temperature=0.8)
    assert e.value.argument == "temperature"


def test_cli_says_lossy(stories_path):
    from specdecode.cli import app

    args = ["generate", "-m", str(stories_path), "-p", STORY_PROMPTS[1], "--method", "pld", "--max-new-tokens", "20"]
    lossy = CliRunner().invoke(app, args + ["--verify", "specdec", "-o", "beta=3", "-o", "tau=1.5"])
    assert lossy.exit_code == 0, lossy.output
    assert "LOSSY" in lossy.output
    exact = CliRunner().invoke(app, args + ["--json"])
    assert json.loads(exact.stdout)["stats"]["lossy"] is False
    bad = CliRunner().invoke(app, args + ["--verify", "specdec", "-o", "beta=0"])
    assert bad.exit_code == 2 and "beta" in bad.output


def test_server_responses_say_lossy(stories_path):
    from fastapi.testclient import TestClient

    from specdecode.server import create_app

    engine = Engine.from_pretrained(stories_path, "suffix", verify="specdec", beta=3, tau=1.0, progress=False)
    with TestClient(create_app(engine, model_name="m")) as client:
        assert client.get("/health").json()["lossy"] is True
        body = {"model": "m", "prompt": STORY_PROMPTS[0], "max_tokens": 10, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        spec = r.json()["speculative"]
        assert spec["lossy"] is True and spec["verify"] == "specdec(beta=3, tau=1)" and spec["method"] == "suffix"
        streamed = client.post("/v1/completions", json={**body, "stream": True}).text
        assert '"lossy": true' in streamed
        r = client.post("/v1/completions", json={**body, "temperature": 1.0})  # sampling: refused
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_bench_reports_lossy_variants_with_agreement(tmp_path, stories_path):
    from specdecode.bench import BenchConfig, parse_methods, run_bench
    from specdecode.bench.questions import default_questions_path, load_questions, select

    specs = parse_methods(
        "vanilla,pld,pld@b3,suffix",
        ["pld@b3.verify=specdec", "pld@b3.beta=3", "pld@b3.tau=2.0"],
    )
    assert [s.base for s in specs] == ["vanilla", "pld", "pld", "suffix"] and specs[2].lossy
    qs = select(load_questions(default_questions_path()), ["mt_bench", "summarization"], 1)
    config = BenchConfig(model=str(stories_path), methods=specs, max_new_tokens=24, threads=1)
    table = io.StringIO()
    outcome = run_bench(config, qs, tmp_path / "out", progress=False, plots=False, file=table)
    summary = outcome.summary
    assert set(summary["lossy"]) == {"pld@b3"}
    overall = summary["results"]["pld@b3"]["overall"]
    assert 0 <= overall["token_agreement"] <= 1
    assert summary["results"]["suffix"]["overall"]["exact_match"] == 1.0  # exact methods stay exact
    assert summary["results"]["suffix"]["overall"]["token_agreement"] == 1.0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "pld@b3 (LOSSY)" in report and "is LOSSY" in report
    assert "LOSSY" in table.getvalue()
    with pytest.raises(InvalidArgument):
        parse_methods("pld@bad.label")
