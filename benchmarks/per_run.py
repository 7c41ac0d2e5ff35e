"""Speedup and mean accepted tokens per run of a `specdecode bench` folder, run by run.

`specdecode bench --runs 2` asks the same questions twice in one process; the report averages
the runs, while this shows each: the second run is a repeated workload, where drafters with a
memory across requests (`suffix`'s store) find the first run's answers.

    python benchmarks/per_run.py bench_out/repeat [--baseline vanilla]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from specdecode.bench.metrics import summarize
from specdecode.bench.report import collect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--baseline", default="vanilla")
    args = parser.parse_args()
    for run, by_method in collect(args.out).items():
        s = summarize({run: by_method}, args.baseline)
        print(f"\nrun {run}: speedup over {args.baseline} / mean accepted tokens\n")
        print("| method | " + " | ".join(s["subtasks"]) + " |")
        print("|---|" + "---|" * len(s["subtasks"]))
        for m in s["methods"]:
            cells = [s["results"][m].get(t) for t in s["subtasks"]]
            print(f"| {m} | " + " | ".join(
                f"{c['speedup']:.2f}x / {c['mean_accepted_tokens']:.2f}" if c and c["speedup"] else "-" for c in cells
            ) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
