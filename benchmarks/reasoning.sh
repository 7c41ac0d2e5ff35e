#!/usr/bin/env bash
# Shorter reasoning, measured (issues 19 and 22): the base prompt, Whisper's searched suffix,
# TokenSkip's adapter at gamma, and both together, on one fixed GSM8K test subset; each decoded
# plainly and with our exact methods. One job at a time on a quiet machine (2 threads).
#   search    specdecode whisper search on GSM8K *train* (skipped when $SUFFIX names a file)
#   accuracy  every setting on the first $TEST_LIMIT test problems, batched with pld (exact, so
#             accuracy and tokens are plain greedy decoding's)
#   timing    every setting one answer at a time on the first $TIME_LIMIT of those problems,
#             vanilla and each of $METHODS: seconds per answer, answers token-identical to vanilla
#   table     benchmarks/reasoning_table.py: one markdown table over all of it
# Settings with TokenSkip need $ADAPTER (a `specdecode tokenskip train` adapter folder).
set -euo pipefail
MODEL=${MODEL:-qwen2.5-coder-0.5b}
OUT=${OUT:-bench_out/reasoning}
TRAIN=${TRAIN:-../shared/data/gsm8k/train.jsonl}
TEST=${TEST:-../shared/data/gsm8k/test.jsonl}
TEST_LIMIT=${TEST_LIMIT:-300}
TIME_LIMIT=${TIME_LIMIT:-30}
METHODS=${METHODS:-"pld pld+quant"}
GAMMA=${GAMMA:-0.6}
ADAPTER=${ADAPTER:-}
SUFFIX=${SUFFIX:-$OUT/search/best_suffix.txt}
STEPS=${STEPS:-"search accuracy timing table"}
DEV=${DEV:-50}
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
common=(--model "$MODEL" --data "$TEST" --threads 2 --quiet)

if [[ " $STEPS " == *" search "* && ! -s "$SUFFIX" ]]; then
  specdecode whisper search --model "$MODEL" --out "$OUT/search" --data "$TRAIN" --dev "$DEV" --rounds "$ROUNDS" \
    --method pld --max-num-seqs 8 --threads 2 --quiet
  SUFFIX=$OUT/search/best_suffix.txt
fi

# name, then the eval arguments that make the setting
settings=("base --ratios 1.0")
[[ -s "$SUFFIX" ]] && settings+=("whisper --ratios 1.0 --suffix $SUFFIX")
if [[ -n "$ADAPTER" ]]; then
  settings+=("tokenskip --ratios $GAMMA --adapter $ADAPTER")
  [[ -s "$SUFFIX" ]] && settings+=("tokenskip+whisper --ratios $GAMMA --adapter $ADAPTER --suffix $SUFFIX")
fi

for s in "${settings[@]}"; do
  read -r name args <<<"$s"
  # shellcheck disable=SC2086
  if [[ " $STEPS " == *" accuracy "* ]]; then
    specdecode tokenskip eval "${common[@]}" --out "$OUT/$name" --limit "$TEST_LIMIT" --method pld --max-num-seqs 8 $args
  fi
  if [[ " $STEPS " == *" timing "* ]]; then
    for m in vanilla $METHODS; do
      # shellcheck disable=SC2086
      specdecode tokenskip eval "${common[@]}" --out "$OUT/$name-time" --limit "$TIME_LIMIT" --method "$m" --max-num-seqs 1 $args
    done
  fi
done

if [[ " $STEPS " == *" table "* ]]; then
  python benchmarks/reasoning_table.py "$OUT" | tee "$OUT/table.md"
fi
