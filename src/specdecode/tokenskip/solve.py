"""``tokenskip solve``: the target answers GSM8K training problems itself.

Greedy, ``max_new_tokens`` 512, the TokenSkip prompt at gamma 1.0, through our engine (batched
with a model-free speculative method by default: exact, so the answers are plain decoding's).
Every answer is written to ``solve.jsonl`` (keyed by the problem's line number), with its
extracted answer, whether it is correct, and its chain-of-thought length in the target's
tokens; ``kept`` marks what the paper keeps for training: correct, and a chain of thought of at
most ``max_cot_tokens`` (500) tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from .answers import extract_answer, is_correct
from .data import load_gsm8k, select
from .prompts import split_cot, tokenskip_prompt
from .runs import Generator, check_positive, check_settings, load_engine, model_label, progress_bar
from .store import JsonlStore, read_rows

SOLVE_FILE = "solve.jsonl"


def solve(model: str, data: str, out: str, *, limit: int | None = None, offset: int = 0, seed: int | None = None,
          method: str = "pld", dtype: str = "auto", device: str = "cpu", max_new_tokens: int = 512,
          max_cot_tokens: int = 500, max_num_seqs: int = 8, chunk: int | None = None, options: dict | None = None,
          progress: bool = True, engine=None) -> dict:  # fmt: skip
    check_positive("max_cot_tokens", max_cot_tokens)
    # Prompts handed to one generate_batch call: the scheduler refills its max_num_seqs slots as
    # answers finish, so only each chunk's tail runs part-empty; rows are written per chunk.
    chunk = check_positive("chunk", chunk if chunk is not None else (4 * max_num_seqs if max_num_seqs > 1 else 1))
    problems = select(load_gsm8k(data), limit, seed=seed, offset=offset)
    out_dir = Path(out)
    settings = {"model": model_label(model), "data": str(Path(data).expanduser().resolve()),
                "max_new_tokens": max_new_tokens, "max_cot_tokens": max_cot_tokens, "dtype": dtype}  # fmt: skip
    check_settings(out_dir / "solve_settings.json", settings, "solve")
    store = JsonlStore(out_dir / SOLVE_FILE, key="index")
    todo = [p for p in problems if p.index not in store]
    if todo:
        engine = engine or load_engine(model, method, dtype=dtype, device=device, options=options, progress=progress)
        gen = Generator(engine, max_new_tokens, max_num_seqs)
        tok = engine.tokenizer
        bar = progress_bar(len(problems), "solve", progress, initial=len(problems) - len(todo))
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            answers = gen([tokenskip_prompt(tok, p.question, 1.0) for p in part])
            rows = []
            for p, (r, seconds) in zip(part, answers):
                pred = extract_answer(r.text)
                ok = is_correct(pred, p.answer)
                cot_tokens = len(tok(split_cot(r.text), add_special_tokens=False)["input_ids"])
                rows.append({
                    "index": p.index, "question": p.question, "gold": p.answer, "output": r.text,
                    "prediction": pred, "correct": ok, "cot_tokens": cot_tokens, "new_tokens": len(r.token_ids),
                    "finish_reason": r.finish_reason, "kept": bool(ok and cot_tokens <= max_cot_tokens),
                    "seconds": round(seconds, 4), "method": engine.method,
                })  # fmt: skip
            store.append(rows)
            bar.update(len(part))
        bar.close()
    return summarize_solve(out_dir, [p.index for p in problems])


def summarize_solve(out_dir: Path, indices: list[int] | None = None) -> dict:
    rows = read_rows(Path(out_dir) / SOLVE_FILE)
    if indices is not None:
        wanted = set(indices)
        rows = [r for r in rows if r["index"] in wanted]
    n = len(rows)
    kept = [r for r in rows if r["kept"]]
    summary = {
        "problems": n,
        "accuracy": sum(r["correct"] for r in rows) / n if n else 0.0,
        "kept": len(kept),
        "mean_cot_tokens_kept": sum(r["cot_tokens"] for r in kept) / len(kept) if kept else 0.0,
        "seconds_per_answer": sum(r["seconds"] for r in rows) / n if n else 0.0,
    }
    (Path(out_dir) / "solve_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
