#!/usr/bin/env bash
# The model-free drafters (issue 11) on Spec-Bench, for BENCHMARKS.md, one job at a time on a
# quiet machine (2 threads each). Results under $OUT (default bench_out/model-free).
#   1. every model-free method beside vanilla, pld and hf-pld, on both models;
#   2. a repeated workload: the same questions twice in one process (benchmarks/per_run.py
#      prints run 1 and run 2 apart; run 2 shows what suffix's cross-request store adds);
#   3. SpecDec's lossy verification with beta 2, 3, 5 (speedup, exact-match share, token agreement).
set -euo pipefail
OUT=${OUT:-bench_out/model-free}
QUESTIONS=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
PER_SUBTASK=${PER_SUBTASK:-3}
TOKENS=${TOKENS:-128}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
common=(--dtype bfloat16 --threads 2 --questions "$QUESTIONS" --per-subtask "$PER_SUBTASK" --max-new-tokens "$TOKENS")

for m in smollm2-135m qwen2.5-coder-1.5b; do
  specdecode bench --model "$m" "${common[@]}" \
    --methods vanilla,pld,suffix,recycle,suffix+recycle,lookahead,hf-vanilla,hf-pld --baseline vanilla \
    --out "$OUT/methods-$m" 2>&1 | tee "$OUT/methods-$m.log"

  specdecode bench --model "$m" "${common[@]}" --methods vanilla,pld,suffix,suffix+recycle --runs 2 \
    --out "$OUT/repeat-$m" 2>&1 | tee "$OUT/repeat-$m.log"
  python benchmarks/per_run.py "$OUT/repeat-$m" | tee "$OUT/repeat-$m.md"

  specdecode bench --model "$m" "${common[@]}" --methods vanilla,suffix,suffix@b2,suffix@b3,suffix@b5 \
    -O suffix@b2.verify=specdec -O suffix@b2.beta=2 -O suffix@b3.verify=specdec -O suffix@b3.beta=3 \
    -O suffix@b5.verify=specdec -O suffix@b5.beta=5 \
    --out "$OUT/specdec-$m" 2>&1 | tee "$OUT/specdec-$m.log"
done
