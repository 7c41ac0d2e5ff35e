#!/usr/bin/env bash
# Everything BENCHMARKS.md reports for a CPU machine, in order, one job at a time (nothing else
# should run meanwhile: 2 threads each). Logs and results go under $OUT (default bench_out/cpu).
#   1. SWIFT's layer-set search on the project's own question suite (not Spec-Bench's), saved;
#   2. Spec-Bench on smollm2-135m: vanilla, pld, swift vs transformers' generate and prompt lookup;
#   3. Spec-Bench on qwen2.5-coder-1.5b (draft 0.5b): every method and every peer;
#   4. the server under load, vanilla vs pld, on smollm2-135m;
#   5. SWIFT with its saved set (search off, fallback on) against vanilla, pld and transformers;
#   6. SWIFT's economics: match score and draft cost of skip sets of growing size.
set -euo pipefail
OUT=${OUT:-bench_out/cpu}
QUESTIONS=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
PER_SUBTASK=${PER_SUBTASK:-2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

for m in smollm2-135m qwen2.5-coder-1.5b; do
  specdecode tune --model "$m" --dtype bfloat16 --out "$OUT/swift-$m.json" --max-prompts 8 \
    --max-new-tokens 128 -o max_opt_steps=300 -o patience=100 2>&1 | tee "$OUT/tune-$m.log"
done

specdecode bench --model smollm2-135m --dtype bfloat16 --threads 2 --questions "$QUESTIONS" \
  --per-subtask "$PER_SUBTASK" --max-new-tokens 128 --methods vanilla,pld,swift,hf-vanilla,hf-pld \
  -O swift.skip_set_file="$OUT/swift-smollm2-135m.json" --baseline hf-vanilla \
  --out "$OUT/bench-smollm2-135m" 2>&1 | tee "$OUT/bench-smollm2-135m.log"

specdecode bench --model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b --dtype bfloat16 --threads 2 \
  --questions "$QUESTIONS" --per-subtask "$PER_SUBTASK" --max-new-tokens 128 \
  --methods vanilla,sps,pld,swift,hf-vanilla,hf-pld,hf-assisted \
  -O swift.skip_set_file="$OUT/swift-qwen2.5-coder-1.5b.json" --baseline hf-vanilla \
  --out "$OUT/bench-qwen2.5-coder-1.5b" 2>&1 | tee "$OUT/bench-qwen2.5-coder-1.5b.log"

python benchmarks/load_server.py --model smollm2-135m --methods vanilla,pld --concurrency 4 --requests 32 \
  --max-tokens 128 --json "$OUT/load_server.json" 2>&1 | tee "$OUT/load_server.log"

specdecode bench --model qwen2.5-coder-1.5b --dtype bfloat16 --threads 2 --questions "$QUESTIONS" \
  --per-subtask "$PER_SUBTASK" --max-new-tokens 128 --methods vanilla,pld,swift,hf-vanilla \
  -O swift.skip_set_file="$OUT/swift-qwen2.5-coder-1.5b.json" -O swift.optimize=false --baseline hf-vanilla \
  --out "$OUT/bench-qwen-swift-v3" 2>&1 | tee "$OUT/bench-qwen-swift-v3.log"

python benchmarks/swift_economics.py --model qwen2.5-coder-1.5b --dtype bfloat16 --questions "$QUESTIONS" \
  --skip-set-file "$OUT/swift-qwen2.5-coder-1.5b.json" --json "$OUT/swift-economics-qwen2.5-coder-1.5b.json" \
  2>&1 | tee "$OUT/swift-economics-qwen.log"
