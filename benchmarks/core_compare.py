"""Side-by-side speed of our methods and transformers' generate, on the same prompts, in one run.

Ours (native backend): vanilla, sps (draft model), pld, and any other method by name. Peers:
transformers' generate plain (hf-vanilla, the baseline), with ``assistant_model=``
(hf-assisted) and with ``prompt_lookup_num_tokens=`` (hf-pld). Greedy; methods interleaved
question by question; one untimed warm-up per method. Reports tokens/s (Spec-Bench style: mean
over questions of new_tokens / wall_time), speedup over hf-vanilla, mean accepted tokens, and how
many outputs equal hf-vanilla's (and our vanilla's) token for token.

    python benchmarks/core_compare.py --model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b \
        --questions ../shared/data/spec_bench/question.jsonl --per-subtask 1 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from specdecode import Engine
from specdecode.hub import resolve_model

MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def pick_questions(path: Path, per_subtask: int) -> list[dict]:
    chosen: dict[str, list[dict]] = defaultdict(list)
    for line in path.read_text().splitlines():
        q = json.loads(line)
        subtask = "mt_bench" if q["category"] in MT_BENCH else q["category"]
        if len(chosen[subtask]) < per_subtask:
            chosen[subtask].append({**q, "subtask": subtask})
    return [q for qs in chosen.values() for q in qs]


class HFPeer:
    def __init__(self, model, assistant=None, prompt_lookup: int | None = None):
        self.model, self.assistant, self.prompt_lookup = model, assistant, prompt_lookup

    def generate(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        kwargs = {}
        if self.assistant is not None:
            kwargs["assistant_model"] = self.assistant
        if self.prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup
        t = time.perf_counter()
        out = self.model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None,
            temperature=None, pad_token_id=self.model.generation_config.eos_token_id, **kwargs,
        )  # fmt: skip
        return out[0, len(ids) :].tolist(), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft-model", default=None, help="enables sps and hf-assisted")
    ap.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    ap.add_argument("--per-subtask", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="vanilla,sps,pld", help="ours, comma-separated")
    ap.add_argument("--peers", default="hf-vanilla,hf-assisted,hf-pld")
    ap.add_argument("--json", type=Path, default=None, help="write per-question records here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = Engine.from_pretrained(args.model, "vanilla", dtype=args.dtype)
    engines = {}
    for m in args.methods.split(","):
        if m == "sps" and not args.draft_model:
            continue
        engines[m] = base.with_method(m, draft_model=args.draft_model if m == "sps" else None)
    hf = AutoModelForCausalLM.from_pretrained(str(base.model_path), dtype=base.target.dtype).eval()
    peers = {}
    for p in args.peers.split(","):
        if p == "hf-vanilla":
            peers[p] = HFPeer(hf)
        elif p == "hf-pld":
            peers[p] = HFPeer(hf, prompt_lookup=10)
        elif p == "hf-assisted" and args.draft_model:
            draft = AutoModelForCausalLM.from_pretrained(str(resolve_model(args.draft_model)), dtype=base.target.dtype)
            peers[p] = HFPeer(hf, assistant=draft.eval())

    questions = pick_questions(args.questions, args.per_subtask)
    prompts = [base.encode([{"role": "user", "content": q["turns"][0]}]) for q in questions]
    # Warm-up (untimed): allocator, thread pools, lazy initialisation.
    for e in engines.values():
        e.generate(prompts[0], max_new_tokens=8)
    for p in peers.values():
        p.generate(prompts[0], 8)

    records = []
    for q, ids in zip(questions, prompts):
        row = {"question_id": q["question_id"], "subtask": q["subtask"], "runs": {}}
        for name, e in engines.items():
            r = e.generate(ids, max_new_tokens=args.max_new_tokens)
            row["runs"][name] = dict(tokens=r.token_ids, time=r.stats.total_time, steps=r.stats.target_forwards)
        for name, p in peers.items():
            toks, t = p.generate(ids, args.max_new_tokens)
            row["runs"][name] = dict(tokens=toks, time=t, steps=None)
        records.append(row)
        print(q["subtask"], {k: f"{len(v['tokens']) / v['time']:.1f} tok/s" for k, v in row["runs"].items()}, flush=True)

    baseline = "hf-vanilla" if "hf-vanilla" in peers else "vanilla"
    names = list(engines) + list(peers)
    tps = {n: statistics.mean(len(r["runs"][n]["tokens"]) / r["runs"][n]["time"] for r in records) for n in names}
    print(f"\n{args.model} ({args.dtype}, {args.threads} threads, {len(records)} questions, "
          f"{args.max_new_tokens} new tokens) on {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}")  # fmt: skip
    print(f"| method | tokens/s | speedup vs {baseline} | mean accepted tokens | same tokens as hf-vanilla | same as our vanilla |")
    print("|---|---|---|---|---|---|")
    for n in names:
        steps = [r["runs"][n]["steps"] for r in records]
        mat = (
            f"{sum(len(r['runs'][n]['tokens']) for r in records) / sum(steps):.2f}" if None not in steps else "-"
        )
        same_hf = sum(r["runs"][n]["tokens"] == r["runs"][baseline]["tokens"] for r in records)
        same_ours = sum(r["runs"][n]["tokens"] == r["runs"]["vanilla"]["tokens"] for r in records) if "vanilla" in engines else "-"
        print(f"| {n} | {tps[n]:.2f} | {tps[n] / tps[baseline]:.2f}x | {mat} | {same_hf}/{len(records)} | {same_ours}/{len(records)} |")
    if args.json:
        args.json.write_text(json.dumps(records))


if __name__ == "__main__":
    main()
