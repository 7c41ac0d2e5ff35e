#!/usr/bin/env bash
# What the model-free drafters' memory and SpecDec's lossy rule add (issue 11), for
# BENCHMARKS.md, one job at a time on a quiet machine (2 threads). Every method side by side on
# Spec-Bench is `benchmarks/methods_suite.sh`. Results under $OUT (default bench_out/model-free).
#   1. a repeated workload: the same questions twice in one process (benchmarks/per_run.py
#      prints run 1 and run 2 apart; run 2 shows what suffix's cross-request store adds);
#   2. a code-editing workload (benchmarks/data/code_edit.jsonl: each function edited three
#      times, later answers reuse earlier ones that no prompt holds): suffix with and without its
#      store, pld, and rest on a datastore of Python's standard library (a code corpus);
#   3. SpecDec's lossy verification with beta 2, 3, 5 (speedup, exact-match share, token agreement).
set -euo pipefail
OUT=${OUT:-bench_out/model-free}
QUESTIONS=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
MODELS=${MODELS:-"smollm2-135m qwen2.5-coder-1.5b"}
PER_SUBTASK=${PER_SUBTASK:-3}
OFFSET=${OFFSET:-5}
TOKENS=${TOKENS:-128}
CODE_EDIT=${CODE_EDIT:-benchmarks/data/code_edit.jsonl}
CODE_EDIT_N=${CODE_EDIT_N:-0}   # questions of the code-editing set (0: all 18)
STEPS=${STEPS:-"repeat code-edit specdec"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
common=(--dtype bfloat16 --threads 2 --max-new-tokens "$TOKENS" --baseline vanilla)
spec=(--questions "$QUESTIONS" --per-subtask "$PER_SUBTASK" --offset "$OFFSET")

corpus="$OUT/stdlib.jsonl"
if [[ " $STEPS " == *" code-edit "* && ! -f "$corpus" ]]; then
  # ~4 MB of Python's own standard library, one module per document: the code corpus for rest.
  python - "$corpus" <<'PY'
import json, pathlib, sys, sysconfig
total, out = 0, open(sys.argv[1], "w")
for p in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
    text = p.read_text(encoding="utf-8", errors="ignore")
    out.write(json.dumps({"text": text}) + "\n")
    total += len(text)
    if total > 4_000_000:
        break
PY
fi

for m in $MODELS; do
  for step in $STEPS; do
    case "$step" in
    repeat)
      specdecode bench --model "$m" "${common[@]}" "${spec[@]}" --methods vanilla,pld,suffix,suffix+recycle --runs 2 \
        --out "$OUT/repeat-$m" 2>&1 | tee "$OUT/repeat-$m.log"
      python benchmarks/per_run.py "$OUT/repeat-$m" | tee "$OUT/repeat-$m.md" ;;
    code-edit)
      [ -d "$OUT/datastore-$m" ] || specdecode datastore build "$corpus" -o "$OUT/datastore-$m" --model "$m"
      specdecode bench --model "$m" "${common[@]}" --questions "$CODE_EDIT" --per-subtask "$CODE_EDIT_N" \
        --methods vanilla,pld,suffix,suffix@nostore,rest,hf-pld -O suffix@nostore.store_tokens=0 \
        -O rest.datastore="$OUT/datastore-$m" --out "$OUT/code-edit-$m" 2>&1 | tee "$OUT/code-edit-$m.log" ;;
    specdec)
      specdecode bench --model "$m" "${common[@]}" "${spec[@]}" --methods vanilla,suffix,suffix@b2,suffix@b3,suffix@b5 \
        -O suffix@b2.verify=specdec -O suffix@b2.beta=2 -O suffix@b3.verify=specdec -O suffix@b3.beta=3 \
        -O suffix@b5.verify=specdec -O suffix@b5.beta=5 \
        --out "$OUT/specdec-$m" 2>&1 | tee "$OUT/specdec-$m.log" ;;
    esac
  done
done
