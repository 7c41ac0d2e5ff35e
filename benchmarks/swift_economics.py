"""Can a layer-skipping draft pay on this machine? SWIFT's economics for one model.

A self-speculative draft token costs ``c`` target forwards (c = draft latency / plain latency)
and is accepted with probability ``a``; chain drafting of depth k then emits 1 + a + ... + a^k
tokens per step for k*c + V(k) forwards (V(k): verifying k+1 tokens, measured). This script
measures both sides for skip sets of growing size:

* ``a``: the match score of the skipping model, teacher-forced on the model's own greedy output
  (the fraction of positions where its argmax is the next token), over one Spec-Bench question
  per subtask — sets built by ranking single sub-layers by how little skipping each one hurts
  (all sub-layers, and MLPs only, which hold ~88% of a layer's weights);
* ``c``: the latency of one drafting forward with that set, against the full forward.

The best chain depth's (1 + a + .. + a^k) / (k c + V(k)) bounds what any drafter with that set
can gain over plain decoding (assuming per-token acceptance a, which teacher-forced scores
approximate). Usage:

    python benchmarks/swift_economics.py --model qwen2.5-coder-1.5b --dtype bfloat16 \\
        --questions ../shared/data/spec_bench/question.jsonl [--skip-set-file tuned.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from specdecode import Engine
from specdecode.backends import SkipSet
from specdecode.bench.questions import default_questions_path, load_questions, subtask_of


def latency(target, skip: SkipSet, tokens: int = 1, repeats: int = 5) -> float:
    start = target.length
    block = torch.full((tokens,), 7)
    target.forward(block, skip=skip)
    target.truncate(start)
    t = time.perf_counter()
    for _ in range(repeats):
        target.forward(block, skip=skip)
        target.truncate(start)
    return (time.perf_counter() - t) / repeats


@torch.inference_mode()
def match_score(target, prompts, outputs, skip: SkipSet, window: int) -> float:
    hits = []
    for prompt, out in zip(prompts, outputs):
        target.reset()
        target.forward(torch.tensor(prompt[:-1]), logits_rows=None)
        block = [prompt[-1]] + out[:window]
        logits = target.forward(torch.tensor(block), skip=skip)
        hits.append(logits[:-1].argmax(-1) == torch.tensor(block[1:]))
    return float(torch.cat(hits).float().mean())


def bound(a: float, c: float, verify: list[float]) -> tuple[float, int]:
    """Best (1 + a + .. + a^k) / (k c + V(k)) over chain depths k >= 0, V in plain forwards."""
    best = (1.0, 0)
    for k in range(1, len(verify)):
        gain = sum(a**i for i in range(k + 1)) / (k * c + verify[k])
        best = max(best, (gain, k))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--questions", default=None)
    ap.add_argument("--window", type=int, default=64, help="generated tokens scored per question")
    ap.add_argument("--skip-set-file", default=None, help="also measure this tuned set")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    engine = Engine.from_pretrained(args.model, dtype=args.dtype, progress=False)
    target = engine.target
    questions, seen = [], set()
    for q in load_questions(args.questions or default_questions_path()):
        if subtask_of(q.category) not in seen:
            seen.add(subtask_of(q.category))
            questions.append(q)
    prompts = [engine.encode([{"role": "user", "content": q.turns[0]}]) for q in questions]
    outputs = [engine.generate(p, max_new_tokens=args.window).token_ids for p in prompts]

    target.reset()
    target.forward(torch.arange(200) % 500 + 10, logits_rows=None)  # a realistic context to decode after
    full = latency(target, SkipSet())
    verify = [latency(target, SkipSet(), tokens=k + 1) / full for k in range(9)]
    inner = range(1, target.config.num_layers - 1)
    single = {}
    for kind in ("attention", "mlp"):
        for i in inner:
            skip = SkipSet(frozenset([i]), frozenset()) if kind == "attention" else SkipSet(frozenset(), frozenset([i]))
            single[(kind, i)] = match_score(target, prompts, outputs, skip, args.window)
    ranked = sorted(single, key=lambda k: -single[k])
    mlp_ranked = [k for k in ranked if k[0] == "mlp"]

    def as_set(keys) -> SkipSet:
        return SkipSet(frozenset(i for k, i in keys if k == "attention"), frozenset(i for k, i in keys if k == "mlp"))

    sets = [("none", SkipSet())]
    for n in (2, 4, 8, 12, 16, 23):
        sets.append((f"best {n} sub-layers", as_set(ranked[:n])))
        sets.append((f"best {n} MLPs", as_set(mlp_ranked[:n])))
    if args.skip_set_file:
        data = json.loads(open(args.skip_set_file).read())
        sets.append(("tuned file", SkipSet(frozenset(data["attention"]), frozenset(data["mlp"]))))

    rows = []
    print(f"plain forward {full * 1000:.1f} ms; verifying k+1 tokens costs " + ", ".join(f"{v:.2f}" for v in verify))
    print("| skip set | attention | MLP | match a | draft cost c | best chain depth | bound vs plain |")
    print("|---|---|---|---|---|---|---|")
    for name, skip in sets:
        a = match_score(target, prompts, outputs, skip, args.window)
        target.reset()
        target.forward(torch.arange(200) % 500 + 10, logits_rows=None)
        c = latency(target, skip) / full
        gain, k = bound(a, c, verify)
        rows.append({"set": name, "attention": sorted(skip.attention), "mlp": sorted(skip.mlp), "match": a, "cost": c,
                     "depth": k, "bound": gain})  # fmt: skip
        print(f"| {name} | {len(skip.attention)} | {len(skip.mlp)} | {a:.3f} | {c:.2f} | {k} | {gain:.3f}x |", flush=True)
    if args.json:
        single_out = [{"sublayer": f"{k}{i}", "match": s} for (k, i), s in single.items()]
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "plain_ms": full * 1000, "verify": verify, "single": single_out, "sets": rows}, f, indent=1)


if __name__ == "__main__":
    main()
