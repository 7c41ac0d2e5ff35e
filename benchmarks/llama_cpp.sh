#!/usr/bin/env bash
# llama.cpp beside our bench: the peer a CPU user would otherwise pick.
#
# Builds llama.cpp from the source tree vendored in the llama-cpp-python sdist (from the package
# index; no git, no hub), converts a model of ours (HF folder or known name) to GGUF with its
# convert_hf_to_gguf.py, quantizes it to Q8_0 and Q4_K_M, and decodes the same Spec-Bench prompts
# as `specdecode bench` (same selection: --per-subtask / --offset, through the chat template):
#   plain    llama-completion, greedy; decode speed = its "eval time" line (prompt excluded)
#   lookup   llama-lookup (n-gram lookup decoding, draft up to 10 tokens, as hf-pld); decode
#            speed = its "decoded N tokens in T seconds" line (prompt excluded)
#   tg       llama-bench's text-generation test (tg MAX_NEW after an empty prompt, 3 repeats):
#            the number llama.cpp users quote (mode "tg" in --modes)
# Writes $WORK/results.json (per model file, mode and question) and prints a table of the mean
# decode tokens/s per subtask. Compare with the "decode tok/s" column of our bench report.
#
#   benchmarks/llama_cpp.sh --model qwen2.5-coder-1.5b --questions ../shared/data/spec_bench/question.jsonl \
#       --per-subtask 3 --max-new-tokens 128 --threads 2
#
# Needs cmake, a C++ compiler and network access to the package index (once). A few minutes to
# build on 2 cores; the model conversion needs about twice the model's bf16 size in memory.
set -euo pipefail

MODEL=qwen2.5-coder-1.5b
QUESTIONS=""
PER_SUBTASK=3
OFFSET=0
MAX_NEW=128
THREADS=2
TYPES="BF16 Q8_0 Q4_K_M"
MODES="tg plain lookup"
WORK=${LLAMA_CPP_WORK:-bench_out/llama.cpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=${PYTHON:-python}
PREPARE_ONLY=0

while (($#)); do
  case $1 in
  --model) MODEL=$2; shift 2 ;;
  --questions) QUESTIONS=$2; shift 2 ;;
  --per-subtask) PER_SUBTASK=$2; shift 2 ;;
  --offset) OFFSET=$2; shift 2 ;;
  --max-new-tokens) MAX_NEW=$2; shift 2 ;;
  --threads) THREADS=$2; shift 2 ;;
  --types) TYPES=$2; shift 2 ;;
  --modes) MODES=$2; shift 2 ;;
  --work) WORK=$2; shift 2 ;;
  --prepare-only) PREPARE_ONLY=1; shift ;;  # build, convert, quantize; no timing
  -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
  *) echo "llama_cpp.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$SRC/build/bin"

# ---- build ---------------------------------------------------------------------------------------
if [[ ! -x $BIN/llama-lookup || ! -x $BIN/llama-completion || ! -x $BIN/llama-quantize ]]; then
  if [[ ! -d $SRC ]]; then
    echo "llama_cpp.sh: downloading the llama-cpp-python $VERSION sdist" >&2
    "$PY" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$WORK" >&2
    tar xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
  fi
  echo "llama_cpp.sh: building llama.cpp (a few minutes)" >&2
  cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  cmake --build "$SRC/build" -j "$(nproc)" --target llama-lookup llama-completion llama-quantize llama-bench >&2
fi

# ---- model ---------------------------------------------------------------------------------------
MODEL_DIR=$("$PY" -c 'import sys; from specdecode.hub import resolve_model; print(resolve_model(sys.argv[1]))' "$MODEL")
NAME=$(basename "$MODEL_DIR")
GGUF_BF16="$WORK/$NAME-BF16.gguf"
if [[ ! -s $GGUF_BF16 ]]; then
  echo "llama_cpp.sh: converting $MODEL_DIR to GGUF (bf16)" >&2
  # The converter imports sentencepiece even for BPE tokenizers: installed beside it, not into
  # the user's environment.
  if ! "$PY" -c 'import sentencepiece' 2>/dev/null && [[ ! -d $WORK/pydeps/sentencepiece ]]; then
    "$PY" -m pip install --quiet --target "$WORK/pydeps" sentencepiece >&2
  fi
  PYTHONPATH="$SRC/gguf-py:$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$SRC/convert_hf_to_gguf.py" "$MODEL_DIR" \
    --outtype bf16 --outfile "$GGUF_BF16.tmp" >&2
  mv "$GGUF_BF16.tmp" "$GGUF_BF16"
fi
for t in $TYPES; do
  f="$WORK/$NAME-$t.gguf"
  if [[ $t != BF16 && ! -s $f ]]; then
    "$BIN/llama-quantize" "$GGUF_BF16" "$f.tmp" "$t" "$THREADS" >&2
    mv "$f.tmp" "$f"
  fi
done

if ((PREPARE_ONLY)); then
  echo "llama_cpp.sh: prepared $WORK ($TYPES)" >&2
  exit 0
fi

# ---- prompts: the bench's selection, through the chat template ---------------------------------------
PROMPTS="$WORK/prompts-$NAME"
rm -rf "$PROMPTS"
mkdir -p "$PROMPTS"
"$PY" - "$MODEL_DIR" "$QUESTIONS" "$PER_SUBTASK" "$OFFSET" "$PROMPTS" <<'EOF'
import sys
from pathlib import Path

from specdecode.bench.questions import SUBTASKS, default_questions_path, load_questions, select
from specdecode.engine import load_tokenizer

model, questions, per_subtask, offset, out = sys.argv[1:]
tok = load_tokenizer(Path(model))
chosen = select(load_questions(questions or default_questions_path()), list(SUBTASKS), int(per_subtask), int(offset))
for q in chosen:
    messages = [{"role": "user", "content": q.turns[0]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) if tok.chat_template else q.turns[0]
    Path(out, f"{q.question_id:04d}-{q.subtask}.txt").write_text(text)
print(f"llama_cpp.sh: {len(chosen)} prompts (first turns)", file=sys.stderr)
EOF

# ---- decode ----------------------------------------------------------------------------------------
RESULTS="$WORK/results-$NAME.jsonl"
: >"$RESULTS"
for t in $TYPES; do
  f="$WORK/$NAME-$t.gguf"
  for mode in $MODES; do
    if [[ $mode == tg ]]; then
      log="$WORK/log-$NAME-$t-tg.txt"
      "$BIN/llama-bench" -m "$f" -t "$THREADS" -p 0 -n "$MAX_NEW" -r 3 -o json >"$log" 2>/dev/null || true
      speed=$("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r[0]["avg_ts"])' "$log" 2>/dev/null || echo null)
      echo "{\"model\": \"$NAME\", \"type\": \"$t\", \"mode\": \"tg\", \"question\": \"tg$MAX_NEW-overall\", \"decode_tokens_per_second\": $speed}" >>"$RESULTS"
      echo "$t tg$MAX_NEW: $speed tok/s" >&2
      continue
    fi
    for p in "$PROMPTS"/*.txt; do
      q=$(basename "$p" .txt)
      log="$WORK/log-$NAME-$t-$mode-$q.txt"
      common=(-m "$f" -f "$p" -n "$MAX_NEW" -t "$THREADS" -c 8192 --temp 0 --seed 0)
      if [[ $mode == plain ]]; then
        "$BIN/llama-completion" "${common[@]}" -no-cnv --no-display-prompt </dev/null >"$log" 2>&1 || true
        speed=$( (grep -E "(llama_perf_context_print|common_perf_print): +eval time" "$log" || true) |
          sed -E 's/.*, *([0-9.]+) tokens per second.*/\1/' | tail -1)
      else
        "$BIN/llama-lookup" "${common[@]}" --spec-draft-n-max 10 </dev/null >"$log" 2>&1 || true
        speed=$( (grep -E "decoded +[0-9]+ tokens in" "$log" || true) | sed -E 's/.*speed: *([0-9.]+) t\/s.*/\1/' | tail -1)
      fi
      if [[ -z $speed ]]; then
        echo "llama_cpp.sh: no speed in $log (last lines follow)" >&2
        tail -5 "$log" >&2
        speed=null
      fi
      echo "{\"model\": \"$NAME\", \"type\": \"$t\", \"mode\": \"$mode\", \"question\": \"$q\", \"decode_tokens_per_second\": $speed}" >>"$RESULTS"
      echo "$t $mode $q: $speed tok/s" >&2
    done
  done
done

"$PY" - "$RESULTS" "$THREADS" <<'EOF'
import json
import sys
from collections import defaultdict

from specdecode.backends.invariance import cpu_model
from specdecode.bench.questions import SUBTASKS

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
speeds = defaultdict(list)
for r in rows:
    if r["decode_tokens_per_second"] is not None:
        subtask = r["question"].split("-", 1)[1]
        for key in dict.fromkeys((subtask, "overall")):
            speeds[(r["type"], r["mode"], key)].append(r["decode_tokens_per_second"])
cols = [s for s in SUBTASKS if any(k[2] == s for k in speeds)] + ["overall"]
print(f"llama.cpp decode tokens/s (prompt excluded), {sys.argv[2]} threads, {cpu_model()}")
print("| model file | mode | " + " | ".join(cols) + " |")
print("|---|---|" + "---|" * len(cols))
for t, mode in dict.fromkeys((k[0], k[1]) for k in speeds):
    cells = [speeds.get((t, mode, c)) for c in cols]
    print(f"| {t} | {mode} | " + " | ".join(f"{sum(v) / len(v):.1f}" if v else "-" for v in cells) + " |")
EOF
