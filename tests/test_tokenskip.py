"""TokenSkip (specdecode.tokenskip): answers, prompts, pruning, the scorer, SFT data, LoRA
training + merge, resumability, bad input, and exactness of eval under speculation.

Everything runs on tiny data; the model-backed tests use stories260K (skipped when absent)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from specdecode.errors import InvalidArgument
from specdecode.tokenskip import answers, prompts
from specdecode.tokenskip.compress import Word, forced_words, join_words, prune, split_words, words_from_tokens
from specdecode.tokenskip.data import load_gsm8k, select
from specdecode.tokenskip.store import JsonlStore, read_rows



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one torch thread (on a busy 2-core machine two threads' OpenMP barriers made
    the LoRA steps 7x slower), restored afterwards for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- answers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output, expected",
    [
        ("so 3+4=7.\n\nThe final answer is: $\\boxed{7}$", "7"),
        ("first \\boxed{3} then \\boxed{\\frac{1}{2}}", "1/2"),  # the last box, nested braces
        ("total \\boxed{\\$1,250.}", "1250"),
        ("\\boxed{18 \\text{ dollars}}", "18"),
        ("She pays 5 + 6 = 11. The answer is 11.", "11"),
        ("The answer is: $42", "42"),
        ("He has 3 apples, then 12, then 1,005", "1005"),  # the last number
        ("no number here", ""),
    ],
)
def test_extract_answer(output, expected):
    assert answers.extract_answer(output) == expected


def test_correctness_and_gold():
    assert answers.gold_answer("2 + 2 = <<2+2=4>>4\n#### 1,024") == "1024"
    assert answers.is_correct("1024.0", "1024")
    assert answers.is_correct("1/2", "0.5")
    assert not answers.is_correct("1023", "1024")
    assert not answers.is_correct("", "0")
    with pytest.raises(ValueError, match="####"):
        answers.gold_answer("no final answer")


# ---- prompts --------------------------------------------------------------------------------


def test_prompt_format_follows_the_paper():
    q = "Tom has 3 apples. How many?"
    assert prompts.format_user(q) == f"{prompts.INSTRUCTION}\n{q}"  # gamma 1.0: nothing added
    assert prompts.format_user(q, 0.6) == f"{prompts.INSTRUCTION}\n{q}<|eot_id|>0.6<|eot_id|>"
    assert prompts.format_user(q, 0.5, suffix="Be brief.") == f"{prompts.INSTRUCTION}\n{q}\nBe brief.<|eot_id|>0.5<|eot_id|>"
    assert prompts.sft_output("a b", "7") == "a b\n\nThe final answer is: $\\boxed{7}$"
    assert prompts.split_cot(prompts.sft_output("a b", "7")) == "a b"
    assert prompts.parse_ratios("1.0, 0.8,0.6") == [1.0, 0.8, 0.6]
    for bad in ("0", "1.5", "abc", "", "0.6,0.6"):
        with pytest.raises(InvalidArgument, match="ratios"):
            prompts.parse_ratios(bad)


# ---- pruning --------------------------------------------------------------------------------

TEXT = "Tom has 3 apples.\nHe buys 12 more, so 3 + 12 = 15.\n\nHe eats 5: 15 - 5 = 10 left."


def _words(text: str, seed: int = 0) -> list[Word]:
    g = torch.Generator().manual_seed(seed)
    spans = split_words(text)
    return [Word(s, e, float(torch.rand(1, generator=g)), 1 + (e - s) // 3) for s, e in spans]


@pytest.mark.parametrize("ratio", [0.9, 0.8, 0.7, 0.6, 0.5, 0.3])
def test_prune_keeps_order_and_hits_the_ratio(ratio):
    for seed in range(5):
        words = _words(TEXT, seed)
        kept = prune(words, ratio)
        assert kept == sorted(kept)
        total = sum(w.cost for w in words)
        used = sum(words[i].cost for i in kept)
        assert used <= ratio * total + 1e-9
        # Within one word of the budget: nothing left out would have fit.
        assert all(used + words[i].cost > ratio * total for i in range(len(words)) if i not in kept)
        # Most important first: a dropped word never outscores a kept one at least as long.
        dropped = [i for i in range(len(words)) if i not in kept]
        for d in dropped:
            for k in kept:
                if words[d].cost <= words[k].cost:
                    assert words[d].score <= words[k].score
        text = join_words(TEXT, words, kept)
        assert text.split() == [TEXT[words[i].start : words[i].end] for i in kept]


def test_prune_full_ratio_forced_and_line_breaks():
    words = _words(TEXT)
    assert join_words(TEXT, words, prune(words, 1.0)) == TEXT  # nothing dropped: the text itself
    forced = forced_words(TEXT, words, keep_digits=True, force_tokens=())
    kept = prune(words, 0.3, forced)
    assert all(i in kept for i, f in enumerate(forced) if f)
    assert "\n\n" in join_words(TEXT, words, list(range(len(words))))
    with pytest.raises(InvalidArgument, match="ratio"):
        prune(words, 0.0)


def test_words_from_tokens():
    text = "ab  cd\nef"
    offsets = [(0, 1), (1, 2), (2, 5), (5, 6), (6, 7), (7, 9)]  # 'a','b','  c','d','\n','ef'
    scores = [1.0, 3.0, 5.0, 7.0, 100.0, 2.0]
    words = words_from_tokens(text, offsets, scores)
    assert [(w.start, w.end, w.cost) for w in words] == [(0, 2, 2), (4, 6, 2), (7, 9, 1)]
    assert [w.score for w in words] == [2.0, 6.0, 2.0]  # a whitespace-only token belongs to no word


# ---- data, store ----------------------------------------------------------------------------

PROBLEMS = [
    ("Tom has 3 apples and gets 2 more. How many?", "5"),
    ("Sue had 10 cats. 4 ran. How many stay?", "6"),
    ("A box has 6 eggs. How many in 2 boxes?", "12"),
    ("Lily is 7. How old in 3 years?", "10"),
    ("Ben had 9 toys and lost 1. How many?", "8"),
]


@pytest.fixture()
def gsm_file(tmp_path) -> Path:
    f = tmp_path / "gsm.jsonl"
    f.write_text("".join(json.dumps({"question": q, "answer": f"work <<x>>\n#### {a}"}) + "\n" for q, a in PROBLEMS))
    return f


def test_load_and_select(gsm_file):
    ps = load_gsm8k(gsm_file)
    assert [p.answer for p in ps] == [a for _, a in PROBLEMS] and [p.index for p in ps] == list(range(5))
    assert [p.index for p in select(ps, 2)] == [0, 1]
    assert [p.index for p in select(ps, 2, offset=3)] == [3, 4]
    sample = [p.index for p in select(ps, 3, seed=1)]
    assert sample == sorted(sample) and sample == [p.index for p in select(ps, 3, seed=1)]
    with pytest.raises(InvalidArgument, match="limit"):
        select(ps, 0)


def test_bad_data_files(tmp_path):
    with pytest.raises(InvalidArgument, match="data: .*not a file"):
        load_gsm8k(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no hashes"}\n')
    with pytest.raises(InvalidArgument, match="line 1.*####"):
        load_gsm8k(bad)
    bad.write_text("{not json\n")
    with pytest.raises(InvalidArgument, match="line 1: not valid JSON"):
        load_gsm8k(bad)


def test_store_drops_a_torn_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    s = JsonlStore(path, key="index")
    s.append([{"index": 0, "v": "a"}, {"index": 1, "v": "b"}])
    with path.open("a") as f:
        f.write('{"index": 2, "v"')  # a kill mid-write
    s = JsonlStore(path, key="index")
    assert 1 in s and 2 not in s and len(s) == 2
    s.append([{"index": 2, "v": "c"}])
    assert [r["index"] for r in read_rows(path)] == [0, 1, 2]


# ---- SFT examples ---------------------------------------------------------------------------


def _compressed_rows(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = PROBLEMS[i % len(PROBLEMS)]
        cot = f"Step one: we count {i} things.\nStep two: so the total is {a}."
        comp = {prompts.format_ratio(g): {"text": " ".join(cot.split()[: max(1, int(g * len(cot.split())))]), "tokens": 1, "ratio": g}
                for g in prompts.PAPER_RATIOS}  # fmt: skip
        rows.append({"index": i, "question": q, "answer": a, "cot": cot, "cot_tokens": 20, "compressed": comp})
    return rows


def test_sft_examples(stories_path, tmp_path):
    from .conftest import make_chat_model

    from specdecode.loading import load_tokenizer
    from specdecode.tokenskip.train import build_sft, tokenize_example

    rows = _compressed_rows(40)
    examples = build_sft(rows, seed=42)
    assert examples == build_sft(rows, seed=42) and examples != build_sft(rows, seed=7)
    assert {e["ratio"] for e in examples} <= {1.0, 0.9, 0.8, 0.7, 0.6, 0.5} and len({e["ratio"] for e in examples}) >= 4
    for e, r in zip(examples, rows):
        cot = r["cot"] if e["ratio"] == 1.0 else r["compressed"][prompts.format_ratio(e["ratio"])]["text"]
        assert e["output"] == f"{cot}\n\nThe final answer is: $\\boxed{{{r['answer']}}}$"
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    for folder in (stories_path, make_chat_model(tmp_path / "chat", stories_path, template)):
        tok = load_tokenizer(folder)
        e = next(x for x in examples if x["ratio"] < 1.0)
        ids, labels = tokenize_example(tok, e)
        prompt = prompts.tokenskip_prompt(tok, e["question"], e["ratio"])
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :] and ids[-1] == tok.eos_token_id
        assert tok.decode(ids[len(prompt) : -1]) .strip() == e["output"].strip()
        text = tok.decode(prompt)
        assert f"<|eot_id|>{e['ratio']}<|eot_id|>" in text.replace(" ", "") or f"<|eot_id|>{e['ratio']}<|eot_id|>" in text
        assert ("<|user|>" in text) == (folder != stories_path)
        cut = tokenize_example(tok, e, cutoff=len(prompt) + 3)
        assert len(cut[0]) == len(cut[1]) == len(prompt) + 3


# ---- the self-information scorer (stories260K) ----------------------------------------------


def test_selfinfo_scorer(stories_path):
    from transformers import AutoModelForCausalLM

    from specdecode.tokenskip.compress import SelfInfoScorer

    scorer = SelfInfoScorer(str(stories_path), progress=False)
    text = "Tom had 3 apples. He ate 1 apple.\nNow Tom has 2 apples."
    offsets, scores = scorer.token_scores(text)
    ids = scorer.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(scores) == len(ids) == len(offsets) and all(math.isfinite(s) and s >= 0 for s in scores)
    # Each score is -log p(token | BOS + the tokens before it), computed here one prefix at a time.
    model = AutoModelForCausalLM.from_pretrained(str(stories_path), dtype=torch.float32).eval()
    seq = [scorer.tokenizer.bos_token_id] + ids
    with torch.no_grad():
        for k in (0, 5, len(ids) - 1):
            logits = model(torch.tensor([seq[: k + 1]])).logits[0, -1]
            assert scores[k] == pytest.approx(float(-torch.log_softmax(logits, -1)[seq[k + 1]]), abs=1e-4)
    # Longer than the context: windows, every token still scored.
    scorer.max_len = 16
    _, windowed = scorer.token_scores(text)
    assert len(windowed) == len(ids) and windowed[:15] == pytest.approx(scores[:15], abs=1e-5)
    scorer.max_len = 512
    words = scorer.words(text)
    assert len(words) == len(text.split())
    out = scorer.compress(text, [0.5], keep_digits=True, force_tokens=())
    assert all(d in out[0.5] for d in "312")
    kept = out[0.5].split()
    it = iter(text.split())
    assert all(w in it for w in kept)  # a subsequence: order kept
    n = len(ids)
    assert len(scorer.tokenizer(out[0.5], add_special_tokens=False)["input_ids"]) <= 0.5 * n + 4


# ---- steps on stories260K: solve / eval resumability and exactness -------------------------


class Counting:
    """An engine wrapper counting the prompts it generates for."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, ids, **kw):
        self.prompts += 1
        return self.engine.generate(ids, **kw)

    def generate_batch(self, prompts, **kw):
        self.prompts += len(prompts)
        return self.engine.generate_batch(prompts, **kw)


@pytest.fixture(scope="module")
def stories_engine(stories_path):
    from specdecode import Engine

    return Engine.from_pretrained(str(stories_path), "vanilla", dtype="float32", progress=False)


def test_solve_resumes_without_redoing(stories_engine, stories_path, gsm_file, tmp_path):
    from specdecode.tokenskip.solve import solve

    out = tmp_path / "work"
    eng = Counting(stories_engine)
    solve(str(stories_path), str(gsm_file), str(out), limit=2, max_new_tokens=12, engine=eng, progress=False)
    assert eng.prompts == 2
    first = read_rows(out / "solve.jsonl")
    with (out / "solve.jsonl").open("a") as f:  # a kill while writing the next row
        f.write('{"index": 2, "question"')
    summary = solve(str(stories_path), str(gsm_file), str(out), limit=4, max_new_tokens=12, engine=eng, progress=False)
    assert eng.prompts == 4  # problems 0 and 1 were not generated again
    rows = read_rows(out / "solve.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and rows[:2] == first
    assert summary["problems"] == 4
    for r in rows:
        assert r["kept"] == (r["correct"] and r["cot_tokens"] <= 500)
        assert r["prediction"] == answers.extract_answer(r["output"])
    # Same folder, other settings: refused, not mixed.
    with pytest.raises(InvalidArgument, match="out: .*max_new_tokens"):
        solve(str(stories_path), str(gsm_file), str(out), limit=4, max_new_tokens=13, engine=eng, progress=False)


def test_eval_speculative_is_token_identical(stories_engine, stories_path, gsm_file, tmp_path):
    from specdecode.tokenskip.evaluate import evaluate

    out = tmp_path / "eval"
    kw = dict(ratios=[1.0, 0.6], limit=2, max_new_tokens=16, progress=False)
    vanilla = Counting(stories_engine)
    evaluate(str(stories_path), str(gsm_file), str(out), method="vanilla", engine=vanilla, **kw)
    assert vanilla.prompts == 4 + 1  # and one untimed warm-up
    pld = stories_engine.with_method("pld")
    report = evaluate(str(stories_path), str(gsm_file), str(out), method="pld", engine=pld, max_num_seqs=2,
                      **{k: v for k, v in kw.items()})  # fmt: skip
    by = {(e["method"], e["ratio"]): e for e in report["results"]}
    for g in (1.0, 0.6):
        e = by[("pld", g)]
        assert e["identical_to_vanilla"] == e["compared_with_vanilla"] == 2
        assert by[("vanilla", g)]["n"] == 2
    for g in (1.0, 0.6):
        v = {r["index"]: r for r in read_rows(out / f"answers-vanilla-{g}.jsonl")}
        p = {r["index"]: r for r in read_rows(out / f"answers-pld-{g}.jsonl")}
        assert all(v[i]["token_ids"] == p[i]["token_ids"] and v[i]["output"] == p[i]["output"] for i in v)
    assert by[("vanilla", 0.6)]["measured_ratio"] is not None
    assert (out / "report.md").read_text().count("| pld |") == 2 and (out / "accuracy_vs_tokens.png").exists()
    # The gamma reached the prompt: the 0.6 prompts are longer by the separator and the ratio.
    v1 = read_rows(out / "answers-vanilla-1.0.jsonl")
    v6 = read_rows(out / "answers-vanilla-0.6.jsonl")
    assert all(b["prompt_tokens"] > a["prompt_tokens"] for a, b in zip(v1, v6))
    # compare: one table, against vanilla at gamma 1.0.
    from specdecode.tokenskip.evaluate import compare

    table = compare([str(out)])
    assert table.startswith(f"baseline: {out} vanilla gamma 1.0") and table.count(f"| {out} |") == 4
    with pytest.raises(InvalidArgument, match="baseline"):
        compare([str(out)], baseline=f"{out}:sps:1.0")
    # Rerun: nothing left to generate.
    again = Counting(stories_engine)
    evaluate(str(stories_path), str(gsm_file), str(out), method="vanilla", engine=again, **kw)
    assert again.prompts == 0


# ---- LoRA training, checkpoints, merge ------------------------------------------------------


def _work_dir(tmp_path: Path, n: int = 6) -> Path:
    work = tmp_path / "w"
    work.mkdir(parents=True)
    with (work / "compressed.jsonl").open("w") as f:
        for r in _compressed_rows(n):
            f.write(json.dumps(r) + "\n")
    return work


TRAIN = dict(lr=5e-3, grad_accum=2, epochs=2, warmup=0.0, save_every=100, progress=False)  # 3 examples: 2 steps/epoch


def test_lora_train_resume_and_merge(stories_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from specdecode import Engine
    from specdecode.tokenskip.merge import merged_model
    from specdecode.tokenskip.train import train

    # One run straight through; one killed after 2 optimizer steps and resumed.
    straight = _work_dir(tmp_path / "a", 3)
    summary = train(str(stories_path), str(straight), **TRAIN)
    killed = _work_dir(tmp_path / "b", 3)
    assert train(str(stories_path), str(killed), stop_after=1, **TRAIN) == {"stopped_at_step": 1, "total_steps": 4}
    assert (killed / "checkpoint" / "adapter_model.safetensors").exists() and not (killed / "adapter").exists()
    train(str(stories_path), str(killed), **TRAIN)
    losses = [x["loss"] for x in json.loads((straight / "adapter" / "loss.json").read_text())]
    resumed = [x["loss"] for x in json.loads((killed / "adapter" / "loss.json").read_text())]
    assert len(losses) == summary["optimizer_steps"] == 4
    assert resumed == pytest.approx(losses, rel=1e-4)  # the resumed run continued where it stopped
    assert sum(losses[-2:]) < sum(losses[:2])  # the loss goes down (2 epochs over the same examples)
    adapter = straight / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "loss.png").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8

    # Merged: a folder our engine loads; greedy output equal to peft's merged model's, float32.
    folder = merged_model(str(stories_path), str(adapter), progress=False)  # in $SPECDECODE_CACHE (a test folder)
    assert folder.parent == Path(os.environ["SPECDECODE_CACHE"]) / "merged"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert merged_model(str(stories_path), str(adapter), progress=False) == folder  # cached: not merged again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    base = AutoModelForCausalLM.from_pretrained(str(stories_path), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
    prompt = prompts.tokenskip_prompt(Engine.from_pretrained(str(folder), progress=False).tokenizer, PROBLEMS[0][0], 0.6)
    with torch.no_grad():
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
    got = Engine.from_pretrained(str(folder), dtype="float32", progress=False).generate(prompt, max_new_tokens=24)
    assert got.token_ids == want[: len(got.token_ids)] and (len(got.token_ids) == 24 or got.finish_reason == "stop")
    # The CLI's generate --adapter (merged into the cache at load) decodes the same tokens.
    from typer.testing import CliRunner

    from specdecode.cli import app

    r = CliRunner().invoke(app, ["generate", "--model", str(stories_path), "--adapter", str(adapter), "-p", PROBLEMS[0][0],
                                 "-o", "cot_ratio=0.6", "--max-new-tokens", "24", "--json", "--dtype", "float32"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["token_ids"] == got.token_ids
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # the CLI used the cached merge
    # The adapter changed the model: the base's greedy answer differs.
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(stories_path), dtype=torch.float32).generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert plain.tolist() != want


def test_bad_input(stories_path, tmp_path, gsm_file):
    from specdecode.tokenskip.compress import compress
    from specdecode.tokenskip.evaluate import evaluate
    from specdecode.tokenskip.merge import merged_model
    from specdecode.reasoning import ReasoningPrompt
    from specdecode.tokenskip.train import train

    empty = tmp_path / "empty"
    with pytest.raises(InvalidArgument, match="out: .*no solve.jsonl"):
        compress(str(stories_path), str(empty))
    with pytest.raises(InvalidArgument, match="out: .*no compressed.jsonl"):
        train(str(stories_path), str(empty))
    with pytest.raises(InvalidArgument, match="scorer"):
        compress(str(stories_path), str(empty), scorer="bert")
    with pytest.raises(InvalidArgument, match="ratios"):
        compress(str(stories_path), str(empty), ratios=[1.0])
    with pytest.raises(InvalidArgument, match="adapter: .*adapter_config.json"):
        merged_model(str(stories_path), str(tmp_path))
    with pytest.raises(InvalidArgument, match="lr"):
        train(str(stories_path), str(_work_dir(tmp_path)), lr=-1)
    with pytest.raises(InvalidArgument, match="cot_ratio"):
        ReasoningPrompt.from_options({"cot_ratio": 2})
    with pytest.raises(InvalidArgument, match="limit"):
        evaluate(str(stories_path), str(gsm_file), str(tmp_path / "e"), limit=0)


def test_cli(stories_path, tmp_path, gsm_file):
    from typer.testing import CliRunner

    from specdecode.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["tokenskip", "eval", "--model", str(stories_path), "--out", str(tmp_path / "e"),
                            "--ratios", "1.0,1.7", "--data", str(gsm_file)])  # fmt: skip
    assert r.exit_code == 2 and "ratios" in r.output and "(0, 1]" in r.output
    r = runner.invoke(app, ["tokenskip", "compress", "--model", str(stories_path), "--out", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "tokenskip solve" in r.output
    r = runner.invoke(app, ["tokenskip", "eval", "--model", str(stories_path), "--out", str(tmp_path / "e"),
                            "--ratios", "1.0,0.6", "--data", str(gsm_file), "--limit", "1", "--max-new-tokens", "8",
                            "--method", "pld", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    last = r.stdout.strip().splitlines()[-1]  # the summary comes last
    assert last.startswith("tokenskip eval [pld] 1 problems | gamma 1.0: accuracy") and "gamma 0.6" in last
    # generate with -o cot_ratio: the prompt is TokenSkip's.
    r = runner.invoke(app, ["generate", "--model", str(stories_path), "-p", "Tom has 3 apples.", "-o", "cot_ratio=0.6",
                            "--max-new-tokens", "4", "--json", "--dtype", "float32"])  # fmt: skip
    assert r.exit_code == 0, r.output
    from specdecode import Engine

    got = json.loads(r.stdout.strip().splitlines()[-1])
    engine = Engine.from_pretrained(str(stories_path), dtype="float32", progress=False)
    ids = prompts.tokenskip_prompt(engine.tokenizer, "Tom has 3 apples.", 0.6)
    assert got["prompt_tokens"] == len(ids) > len(engine.encode("Tom has 3 apples.")) + 20
    assert got["token_ids"] == engine.generate(ids, max_new_tokens=4).token_ids


def test_compress_step_resumes_and_meets_the_ratios(stories_path, tmp_path, monkeypatch):
    from specdecode.loading import load_tokenizer
    from specdecode.tokenskip import compress as compress_mod

    work = tmp_path / "w"
    work.mkdir()
    chains = [
        "Tom had 3 red apples in a big box. He gave 1 apple to his sister Lily.\nSo now Tom has 3 - 1 = 2 apples.",
        "The dog ran to the park with a ball. It played with the ball all day long.\nThen the dog went home.",
        "Sue saw 4 birds in a tree and 5 birds on the grass. In all she saw 4 + 5 = 9 birds.",
    ]
    with (work / "solve.jsonl").open("w") as f:
        for i, c in enumerate(chains):
            f.write(json.dumps({"index": i, "question": f"q{i}", "output": c, "prediction": str(i), "kept": True}) + "\n")
        f.write(json.dumps({"index": 9, "question": "q9", "output": "wrong", "prediction": "0", "kept": False}) + "\n")
    built = []
    real = compress_mod.make_scorer
    monkeypatch.setattr(compress_mod, "make_scorer", lambda *a, **k: built.append(1) or real(*a, **k))
    ratios = [0.8, 0.5]
    kw = dict(ratios=ratios, progress=False, keep_digits=False)
    compress_mod.compress(str(stories_path), str(work), limit=2, **kw)
    summary = compress_mod.compress(str(stories_path), str(work), **kw)
    assert len(built) == 2 and summary["chains"] == 3  # the second call scored only the third chain
    compress_mod.compress(str(stories_path), str(work), **kw)
    assert len(built) == 2  # nothing left: no scorer loaded
    tok = load_tokenizer(stories_path)
    rows = read_rows(work / "compressed.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r in rows:
        n = len(tok(r["cot"], add_special_tokens=False)["input_ids"])
        assert r["cot_tokens"] == n
        for g in ratios:
            c = r["compressed"][prompts.format_ratio(g)]
            assert c["tokens"] == len(tok(c["text"], add_special_tokens=False)["input_ids"])
            # Scorer and target share the tokenizer here: the ratio is met to within a word or two
            # (re-tokenizing joined words can merge or split a token at a boundary).
            assert c["tokens"] <= g * n + 4 and c["tokens"] >= g * n - 12
            it = iter(r["cot"].split())
            assert all(w in it for w in c["text"].split())
    with pytest.raises(InvalidArgument, match="out: .*scorer_model"):
        compress_mod.compress(str(stories_path), str(work), scorer_model=str(stories_path), **kw)
    # selfinfo keeps digits unless told not to: another setting than this folder's.
    with pytest.raises(InvalidArgument, match="out: .*keep_digits=False, not True"):
        compress_mod.compress(str(stories_path), str(work), ratios=ratios, progress=False)


def test_llmlingua2_is_optional():
    try:
        import llmlingua  # noqa: F401
    except ModuleNotFoundError:
        from specdecode.tokenskip.compress import LLMLingua2Scorer

        with pytest.raises(InvalidArgument, match="scorer: llmlingua2 needs the llmlingua package"):
            LLMLingua2Scorer()
    else:
        pytest.skip("llmlingua is installed: the missing-package error cannot be shown")


def test_serving_helpers(stories_path):
    from specdecode.reasoning import ReasoningPrompt
    from specdecode.tokenskip.serving import refuse_server_ratio, with_adapter

    reasoning, options = ReasoningPrompt.from_options({"cot_ratio": "0.6", "max_ngram": 3})
    assert (reasoning.cot_ratio, reasoning.suffix, options) == (0.6, None, {"max_ngram": 3})
    assert with_adapter(str(stories_path), None) == str(stories_path)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "Q?"}]
    assert reasoning.apply(msgs)[0][1]["content"] == prompts.format_user("Q?", 0.6) and msgs[1]["content"] == "Q?"
    assert ReasoningPrompt(0.5).apply("Q?") == (prompts.format_user("Q?", 0.5) + "\n", {"cot_ratio": 0.5})
    assert ReasoningPrompt().apply("Q?") == ("Q?", {})
    refuse_server_ratio(None)
    with pytest.raises(InvalidArgument, match="cot_ratio: serve takes the ratio per request"):
        refuse_server_ratio(0.6)


def test_server_writes_a_requests_cot_ratio_into_its_prompt(stories_path):
    """The OpenAI request field ``cot_ratio``: the completion is the engine's for the prompt
    formatted the TokenSkip way; out of (0, 1] it is a 400 naming the field."""
    from fastapi.testclient import TestClient

    from specdecode import Engine
    from specdecode.server import create_app
    from specdecode.reasoning import ReasoningPrompt

    engine = Engine.from_pretrained(stories_path, "pld", progress=False)
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    want = engine.generate(ReasoningPrompt(0.6).apply(question)[0], max_new_tokens=12).text
    plain = engine.generate(question, max_new_tokens=12).text
    with TestClient(create_app(engine, model_name="m", max_num_seqs=1)) as c:
        body = {"model": "m", "prompt": question, "max_tokens": 12, "temperature": 0}
        r = c.post("/v1/completions", json={**body, "cot_ratio": 0.6})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == plain
        bad = c.post("/v1/completions", json={**body, "cot_ratio": 1.5})
        assert bad.status_code in (400, 422) and "cot_ratio" in bad.text


def test_run_pipeline_goes_on_from_what_is_done(stories_path, tmp_path, gsm_file):
    """`tokenskip run` over a folder whose solve step is done (written here, as a finished solve
    would): it solves nothing again, compresses, trains and evaluates the adapter."""
    from typer.testing import CliRunner

    from specdecode.cli import app

    work = tmp_path / "w"
    work.mkdir()
    with (work / "solve.jsonl").open("w") as f:
        for i, (q, a) in enumerate(PROBLEMS[:2]):
            out = f"We add the numbers one by one.\nSo the answer is {a}.\n\nThe final answer is: $\\boxed{{{a}}}$"
            f.write(json.dumps({"index": i, "question": q, "gold": a, "output": out, "prediction": a, "correct": True,
                                "cot_tokens": 30, "kept": True, "seconds": 0.0}) + "\n")  # fmt: skip
    r = CliRunner().invoke(app, [
        "tokenskip", "run", "--model", str(stories_path), "--out", str(work), "--data", str(gsm_file), "--limit", "2",
        "--max-steps", "1", "--eval-limit", "1", "--test-data", str(gsm_file), "--eval-ratios", "1.0,0.5",
        "--max-num-seqs", "1", "--dtype", "float32", "--quiet",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(read_rows(work / "solve.jsonl")) == 2  # nothing solved again
    assert [x["index"] for x in read_rows(work / "compressed.jsonl")] == [0, 1]
    assert (work / "adapter" / "adapter_model.safetensors").exists()
    report = json.loads((work / "eval" / "report.json").read_text())
    assert report["settings"]["adapter"] == str((work / "adapter").resolve())
    assert [(e["method"], e["ratio"]) for e in report["results"]] == [("pld", 1.0), ("pld", 0.5)]
    assert r.stdout.strip().splitlines()[-1].startswith("tokenskip eval [pld] 1 problems | gamma 1.0")
