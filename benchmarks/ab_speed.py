r"""Decode speed of two versions of specdecode side by side (a commit against the working tree).

Each round runs every (version, method) in a fresh process, versions interleaved (A, B, A, B, ...)
so that a drift of the machine's speed hits both alike; a process loads the model once, warms
up, then generates the same prompts greedily and reports decode tokens/s (prefill excluded) and
the answers' token ids (which must agree between versions: both are exact).

    git worktree add /tmp/specdecode-old <commit>
    python benchmarks/ab_speed.py --old /tmp/specdecode-old/src --model qwen2.5-coder-1.5b \
        --methods vanilla,pld,pld+quant --rounds 3 --out bench_out/ab_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number, with a docstring and a test.",
    "Explain, in three short paragraphs, why the sky is blue.",
    "Summarize the following text in one sentence: The committee met on Tuesday to discuss the budget. "
    "After a long debate, the committee agreed to raise the budget for schools by ten percent and to "
    "cut the budget for roads by five percent. The decision will be reviewed next year.",
]

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
import specdecode
from specdecode import Engine
model, method, _, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
prompts = json.loads(sys.argv[5])
engine = Engine.from_pretrained(model, method, dtype="bfloat16", progress=False)
engine.generate([{"role": "user", "content": "Hello"}], max_new_tokens=8)  # warm-up
decode_s, new, ids = 0.0, 0, []
for p in prompts:
    r = engine.generate([{"role": "user", "content": p}], max_new_tokens=tokens)
    decode_s += r.stats.total_time - r.stats.prefill_time
    new += r.stats.new_tokens
    ids.append(r.token_ids)
print(json.dumps({"decode_tok_s": new / decode_s, "new_tokens": new, "ids": ids, "where": specdecode.__file__}))
"""


def run(src: str | None, model: str, method: str, threads: int, tokens: int) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD, model, method, str(threads), str(tokens), json.dumps(PROMPTS)],
                         env=env, capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="the other version's src/ folder (e.g. a git worktree's)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--methods", default="vanilla,pld")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if not (Path(a.old) / "specdecode").is_dir():
        ap.error(f"--old: expected a src/ folder holding specdecode/, got {a.old!r}")
    methods = [m for m in a.methods.split(",") if m]
    speeds: dict[tuple[str, str], list[float]] = {}
    answers: dict[tuple[str, str], list] = {}
    for r in range(a.rounds):
        for method in methods:
            for version, src in (("old", a.old), ("new", None)):
                res = run(src, a.model, method, a.threads, a.max_new_tokens)
                speeds.setdefault((version, method), []).append(res["decode_tok_s"])
                answers[(version, method)] = res["ids"]
                print(f"round {r + 1} {version:3} {method:10} {res['decode_tok_s']:7.2f} tok/s  ({res['where']})", flush=True)
    rows = []
    print(f"\n{'method':10} {'old tok/s':>10} {'new tok/s':>10} {'new/old':>8}  same answers")
    for method in methods:
        old, new = statistics.median(speeds[("old", method)]), statistics.median(speeds[("new", method)])
        same = answers[("old", method)] == answers[("new", method)]
        rows.append({"method": method, "old": old, "new": new, "ratio": new / old, "same_answers": same,
                     "old_runs": speeds[("old", method)], "new_runs": speeds[("new", method)]})  # fmt: skip
        print(f"{method:10} {old:10.2f} {new:10.2f} {new / old:8.3f}  {same}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"model": a.model, "threads": a.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
