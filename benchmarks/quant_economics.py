"""Can a quantized copy of the target pay as its drafter? The ``quant`` method's economics.

For each quantized copy (int4 at several group sizes, int8; lm_head in full precision or not):

* ``a``: teacher-forced agreement with the model, on its own greedy answers to one Spec-Bench
  question per subtask: the fraction of positions where the copy's argmax is the model's next
  token. Two ways, as the drafter can run: ``shared`` — the copy attends to the model's own
  (full-precision) cache of the prefix and computes only the current token, as ``quant`` drafts
  by default; ``own`` — the copy computes the whole sequence itself (a separate quantized model
  with its own cache, ``-o cache=own``);
* ``c``: the latency of one draft forward (one token, through the copy) against one plain
  forward, after a context of 200 tokens;
* the bound (1 + a + .. + a^k) / (k c + V(k)) over chain depths k, V(k) the measured cost of
  verifying k + 1 tokens (see swift_economics.py);
* the bytes the copy adds, and how long it takes to build.

    python benchmarks/quant_economics.py --model qwen2.5-coder-1.5b --dtype bfloat16 \\
        --questions ../shared/data/spec_bench/question.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from swift_economics import bound  # noqa: E402

from specdecode import Engine  # noqa: E402
from specdecode.backends.quant import QuantConfig, quantized_copy  # noqa: E402
from specdecode.bench.questions import default_questions_path, load_questions, subtask_of  # noqa: E402


def latency(target, weights=None, tokens: int = 1, repeats: int = 7) -> float:
    """Median seconds of a forward of ``tokens`` tokens after the cache, through ``weights``."""
    start = target.length
    block = torch.full((tokens,), 7)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        target.forward(block, weights=weights)
        times.append(time.perf_counter() - t)
        target.truncate(start)
    return sorted(times[1:])[repeats // 2]


@torch.inference_mode()
def agreement_own(target, weights, prompts, outputs) -> float:
    hits = []
    for prompt, out in zip(prompts, outputs):
        target.reset()
        seq = prompt + out
        logits = target.forward(torch.tensor(seq[:-1]), weights=weights, logits_rows=slice(len(prompt) - 1, None))
        hits.append(logits.argmax(-1) == torch.tensor(out))
    target.reset()
    return float(torch.cat(hits).float().mean())


@torch.inference_mode()
def agreement_shared(target, weights, prompts, outputs) -> float:
    """Each position drafted alone over the model's full-precision cache of everything before it
    (the slot it writes is put back afterwards)."""
    hits = []
    for prompt, out in zip(prompts, outputs):
        target.reset()
        seq = prompt + out
        target.forward(torch.tensor(seq[:-1]), logits_rows=None)
        end = target.length
        for j in range(len(prompt) - 1, len(seq) - 1):
            k, v = target.k_cache[:, :, j].clone(), target.v_cache[:, :, j].clone()
            target.truncate(j)
            logits = target.forward(torch.tensor([seq[j]]), weights=weights)
            hits.append(int(logits[0].argmax()) == seq[j + 1])
            target.k_cache[:, :, j], target.v_cache[:, :, j] = k, v
            target.length = end  # the cache past j is intact: only slot j was written
    target.reset()
    return sum(hits) / len(hits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--questions", default=None)
    ap.add_argument("--window", type=int, default=64, help="generated tokens scored per question")
    ap.add_argument("--configs", default="int4-g32,int4-g128,int8,int4-g32+head,int4-g128+head",
                    help="comma-separated: int4-gN or int8, '+head' to quantize the lm_head too")
    ap.add_argument("--no-shared", action="store_true", help="skip the (slower) shared-cache agreement")
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

    def context() -> None:
        target.reset()
        target.forward(torch.arange(200) % 500 + 10, logits_rows=None)  # a realistic context to decode after

    context()
    full = latency(target)
    verify = [latency(target, tokens=k + 1) / full for k in range(13)]
    print(f"plain forward {full * 1000:.1f} ms; verifying k+1 tokens costs " + ", ".join(f"{v:.2f}" for v in verify))
    print("| copy | bytes added | build s | agreement shared | agreement own | draft cost c | best depth | bound vs plain |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.configs.split(","):
        label, head = name.removesuffix("+head"), name.endswith("+head")
        config = QuantConfig.parse(label, "configs", lm_head=head)
        t = time.perf_counter()
        weights = quantized_copy(target, config)
        build = time.perf_counter() - t
        a_own = agreement_own(target, weights, prompts, outputs)
        a_shared = None if args.no_shared else agreement_shared(target, weights, prompts, outputs)
        context()
        c = latency(target, weights) / full
        a = a_shared if a_shared is not None else a_own
        gain, k = bound(a, c, verify)
        rows.append({"copy": name, "bytes": weights.nbytes, "build_s": build, "agreement_shared": a_shared,
                     "agreement_own": a_own, "cost": c, "depth": k, "bound": gain})  # fmt: skip
        shared = "-" if a_shared is None else f"{a_shared:.3f}"
        print(f"| {name} | {weights.nbytes / 2**20:.0f} MiB | {build:.1f} | {shared} | {a_own:.3f} | {c:.2f} | {k} | {gain:.2f}x |", flush=True)
        del weights
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "plain_ms": full * 1000, "verify": verify, "copies": rows}, f, indent=1)


if __name__ == "__main__":
    main()
