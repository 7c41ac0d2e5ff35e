"""Fidelity benchmark: does every method's greedy output equal plain greedy decoding?

For each method, on Spec-Bench questions (first turn, through the chat template, 64 new tokens):
* float32: against transformers' own `generate` (greedy) — the reference implementation;
* bf16: against our own plain decoding in bf16 — bit-exactness of speculation on this machine
  (transformers' bf16 kernels round differently from ours, so bf16 is compared within one
  implementation; see BENCHMARKS.md).
Reported per method and dtype: identical outputs / total and the positions of first
divergence. Exactness is about tokens, not time, so a busy machine only slows this down.

    python benchmarks/fidelity.py --model smollm2-135m --questions ../shared/data/spec_bench/question.jsonl \
        --per-subtask 17 --methods vanilla,pld,swift --out bench_out/fidelity-smollm2.json
    # sps without a smaller sibling: the target drafts for itself through an int4 copy
    python benchmarks/fidelity.py --model smollm2-135m --methods vanilla,sps --draft-model smollm2-135m \
        --draft-quant int4 --sizing fixed ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

from specdecode import Engine
from specdecode.bench.peers import HFPeer, load_hf_model
from specdecode.bench.questions import SUBTASKS, default_questions_path, load_questions, select
from specdecode.doctor import machine
from specdecode.sizing import SIZINGS
from specdecode.errors import InvalidArgument


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def prompts_for(engine: Engine, questions) -> list[tuple[int, str, list[int]]]:
    """(question_id, subtask, prompt ids) for the questions that fit the model's context."""
    out, skipped = [], 0
    for q in questions:
        messages = [{"role": "user", "content": q.turns[0]}]
        try:
            ids = engine.encode(messages if engine.tokenizer.chat_template else q.turns[0])
        except InvalidArgument:
            skipped += 1
            continue
        out.append((q.question_id, q.subtask, ids))
    if skipped:
        print(f"skipped {skipped} question(s) longer than the model's context", file=sys.stderr)
    return out


def compare(reference: dict[int, list[int]], outputs: dict[int, list[int]]) -> dict:
    firsts = {qid: first_difference(outputs[qid], ref) for qid, ref in reference.items()}
    differing = {qid: f for qid, f in firsts.items() if f is not None}
    return {"equal": len(reference) - len(differing), "total": len(reference),
            "first_differences": dict(sorted(differing.items()))}  # fmt: skip


def run_methods(engine: Engine, methods: list[str], prompts, max_new_tokens: int, options: dict):
    """Each method's output token ids per question, and how many draft tokens it verified and
    accepted (how much speculation the comparison exercised)."""
    outputs, drafts = {}, {}
    for method in methods:
        e = engine if method == "vanilla" else engine.with_method(method, progress=False, **options.get(method, {}))
        t = time.perf_counter()
        results = {qid: e.generate(ids, max_new_tokens=max_new_tokens) for qid, _, ids in prompts}
        outputs[method] = {qid: r.token_ids for qid, r in results.items()}
        # How much speculation was tested: drafts verified, and how many were rejected.
        verified = sum(r.stats.verified_draft_tokens for r in results.values())
        accepted = sum(r.stats.accepted_draft_tokens for r in results.values())
        drafts[method] = {"verified_draft_tokens": verified, "accepted_draft_tokens": accepted}
        print(f"  {method}: {len(prompts)} prompts in {time.perf_counter() - t:.0f}s, "
              f"{accepted}/{verified} draft tokens accepted", file=sys.stderr)
    return outputs, drafts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", default=str(default_questions_path()))
    ap.add_argument("--per-subtask", type=int, default=17, help="questions per subtask (6 subtasks)")
    ap.add_argument("--offset", type=int, default=0, help="skip the first N questions of each subtask")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--methods", default="vanilla,pld,swift")
    ap.add_argument("--draft-model", default=None, help="for sps")
    ap.add_argument("--draft-quant", default=None,
                    help="for sps: quantize the draft model (int4, int8). With --draft-model set to the target "
                         "itself this checks sps's verification where no smaller sibling exists: the int4 copy's "
                         "drafts differ from the target's choices often enough to be rejected.")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--sizing", default=None, choices=SIZINGS,
                    help="draft sizing of every method (default: the engine's, payoff). `fixed` makes a "
                         "drafter that payoff would turn off (a self-draft through an int4 copy) draft on "
                         "every step, so that its verification is exercised")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench_out/fidelity.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    options = {m: {} for m in methods}
    if args.draft_model:
        options["sps"] = {"draft_model": args.draft_model, "draft_quant": args.draft_quant}
    if args.sizing:
        for m in methods:
            if m != "vanilla":
                options[m]["sizing"] = args.sizing
    questions = select(load_questions(args.questions), list(SUBTASKS), args.per_subtask, args.offset)
    report = {"model": args.model, "machine": machine(), "date": dt.date.today().isoformat(),
              "max_new_tokens": args.max_new_tokens, "question_ids": [q.question_id for q in questions],
              "results": {}}  # fmt: skip
    for dtype in args.dtypes.split(","):
        print(f"{dtype}:", file=sys.stderr)
        engine = Engine.from_pretrained(args.model, "vanilla", dtype=dtype, progress=False)
        prompts = prompts_for(engine, questions)
        outputs, drafts = run_methods(engine, methods, prompts, args.max_new_tokens, options)
        if dtype in ("float32", "fp32"):
            target = engine.target
            peer = HFPeer("hf-vanilla", {}, load_hf_model(engine.model_path, torch.float32, target.device, False),
                          eos_ids=engine.eos_ids, pad_id=getattr(engine.tokenizer, "pad_token_id", None),
                          max_length=target.max_length)  # fmt: skip
            t = time.perf_counter()
            reference = {qid: peer.run_turn(ids, args.max_new_tokens, 0.0, None).token_ids for qid, _, ids in prompts}
            print(f"  transformers generate: {time.perf_counter() - t:.0f}s", file=sys.stderr)
            against = "transformers generate (float32)"
        else:
            reference = outputs["vanilla"]
            against = f"our vanilla ({dtype})"
        report["results"][dtype] = {
            "against": against,
            "subtasks": {s: sum(1 for _, sub, _ in prompts if sub == s) for s in SUBTASKS},
            "methods": {m: compare(reference, outputs[m]) for m in methods if not (m == "vanilla" and reference is outputs[m])},
            "drafts": drafts,
        }
        del engine
        out = Path(args.out)  # written after each dtype: a long run keeps what it finished
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nfidelity on {args.model}, {args.max_new_tokens} tokens, {report['machine']['cpu']} ({report['date']})")
    print("| dtype | against | method | identical | first differences (question: token) |")
    print("|---|---|---|---|---|")
    for dtype, r in report["results"].items():
        for m, c in r["methods"].items():
            diffs = ", ".join(f"{q}: {p}" for q, p in c["first_differences"].items()) or "—"
            print(f"| {dtype} | {r['against']} | {m} | {c['equal']}/{c['total']} | {diffs} |")


if __name__ == "__main__":
    main()
