#!/usr/bin/env bash
# Every method side by side on Spec-Bench (issues 10 and 11), for BENCHMARKS.md: our vanilla,
# the lookup drafters, the model drafters, the hybrids and `auto`, against transformers' own
# generate (plain, prompt lookup, assisted). One `specdecode bench` run per model, all methods
# interleaved question by question, on a quiet machine. Results under $OUT.
#   MODELS="smollm2-135m qwen2.5-coder-1.5b" PER_SUBTASK=3 OFFSET=5 bash benchmarks/methods_suite.sh
set -euo pipefail
OUT=${OUT:-bench_out/methods}
QUESTIONS=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
MODELS=${MODELS:-"smollm2-135m qwen2.5-coder-1.5b"}
PER_SUBTASK=${PER_SUBTASK:-3}
OFFSET=${OFFSET:-5}     # held-out questions: not the ones earlier entries of BENCHMARKS.md used
TOKENS=${TOKENS:-128}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
common=(--dtype bfloat16 --threads "$THREADS" --questions "$QUESTIONS" --per-subtask "$PER_SUBTASK"
        --offset "$OFFSET" --max-new-tokens "$TOKENS" --baseline vanilla)
free=vanilla,pld,suffix,recycle,suffix+recycle,lookahead,quant,pld+quant,auto

for m in $MODELS; do
  case "$m" in
    qwen2.5-coder-1.5b) extra=(--draft-model qwen2.5-coder-0.5b); methods=$free,sps,hf-vanilla,hf-pld,hf-assisted ;;
    *) extra=(); methods=$free,hf-vanilla,hf-pld ;;   # no smaller sibling: no sps / hf-assisted
  esac
  methods=${METHODS:-$methods}   # METHODS=...: a subset (e.g. when time is short)
  specdecode bench --model "$m" "${common[@]}" "${extra[@]}" --methods "$methods" \
    --out "$OUT/$m" 2>&1 | tee "$OUT/$m.log"
done
