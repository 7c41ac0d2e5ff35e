#!/usr/bin/env bash
# The issue's full Spec-Bench comparison: every method of ours and transformers' three peers on
# Qwen2.5-Coder-1.5B-Instruct (draft: Qwen2.5-Coder-0.5B-Instruct), bf16, 2 CPU threads,
# PER_SUBTASK questions per subtask of Spec-Bench's question file, 128 new tokens.
#
#   benchmarks/spec_bench.sh [extra `specdecode bench` options...]
#
# Settings come from the environment (defaults below). Interrupted? Run it again: it resumes.
# Results: $OUT/report.md, summary.json, speedup.png, accept_lengths.png; answer files under
# $OUT/answers/ (Spec-Bench's format, readable by its evaluation/speed.py).
set -euo pipefail

QUESTIONS=${QUESTIONS:-/work/shared/data/spec_bench/question.jsonl}
MODEL=${MODEL:-qwen2.5-coder-1.5b}
DRAFT=${DRAFT:-qwen2.5-coder-0.5b}
PER_SUBTASK=${PER_SUBTASK:-3}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
THREADS=${THREADS:-2}
RUNS=${RUNS:-1}
OUT=${OUT:-bench_out/spec_bench_${MODEL}}

if [[ ! -f "$QUESTIONS" ]]; then
    echo "Spec-Bench's question.jsonl not found at $QUESTIONS (set QUESTIONS=...)" >&2
    exit 2
fi

# "ours" = every method registered in specdecode.drafters.METHODS, whatever it holds today.
exec specdecode bench \
    --model "$MODEL" --draft-model "$DRAFT" --dtype bfloat16 --threads "$THREADS" \
    --questions "$QUESTIONS" --per-subtask "$PER_SUBTASK" --max-new-tokens "$MAX_NEW_TOKENS" \
    --methods ours,hf-vanilla,hf-pld,hf-assisted --baseline hf-vanilla --runs "$RUNS" \
    --out "$OUT" "$@"
