#!/usr/bin/env bash
# llama-curves.sh: llama.cpp's own benchmarks on the shapes of our throughput curves, written
# into one folder that `throughput compare` reads beside our reports (docs/llama-cpp.md).
#
# Usage (in the repository root):
#   LLAMA_DIR=/work/llama.cpp GGUF_PREFIX=/work/gguf/ scripts/llama-curves.sh OUT_DIR
#   throughput compare --out-dir OUT_DIR OUT_DIR [OUT_DIR/ours or OUR_REPORT.json ...]
#
# For every model M in MODELS and GGUF type D in DTYPES it reads ${GGUF_PREFIX}M-D.gguf and writes
#   OUT_DIR/llama-bench_M-D.json           llama-bench -p PROMPTS -n NEW_TOKENS -r REPS -t THREADS -o json:
#                                          prefill (pp) and decode (tg) tokens/s: context and family axes
#   OUT_DIR/llama-batched-bench_M-D.jsonl  llama-batched-bench -npp PROMPTS -ntg NEW_TOKENS -npl SEQUENCES:
#                                          decode tokens/s of SEQUENCES sequences at once: concurrency
#                                          axis (its lines do not name the model: the file name does)
# and their stderr beside them (.log). With OURS=1 it also runs our side of the same shapes into
# OUT_DIR/ours/: `throughput --mode batched --levels SEQUENCES` per model, type and prompt length
# (the counterpart types: f32 for f32, bf16 for f16, int8 for q8_0), and the `--sweep` runs of the
# context and family axes when this throughput has --sweep (otherwise they are printed, not run).
#
# Environment (default):
#   LLAMA_DIR    a llama.cpp checkout built with build/bin/llama-bench and llama-batched-bench (required)
#   GGUF_PREFIX  the GGUF files' common start, e.g. /work/gguf/ for /work/gguf/124m-f32.gguf (required)
#   MODELS       124m               models, comma-separated (our synthetic presets: weights/synthetic/M-seed0)
#   DTYPES       f32                GGUF types, comma-separated: f32, f16, q8_0
#   PROMPTS      6,128,512,900      prompt tokens per sequence
#   NEW_TOKENS   30                 tokens generated per sequence
#   SEQUENCES    1,2,4,8,16         sequences decoded together (our concurrency)
#   THREADS      2                  compute threads, both engines
#   REPS         3                  llama-bench repetitions of every test
#   OURS         0                  1: run our side too (needs target/release/throughput)
#   THROUGHPUT   target/release/throughput
set -euo pipefail

OUT=${1:?usage: LLAMA_DIR=... GGUF_PREFIX=... $0 OUT_DIR}
BIN=${LLAMA_DIR:?set LLAMA_DIR to a llama.cpp checkout (docs/llama-cpp.md)}/build/bin
PREFIX=${GGUF_PREFIX:?set GGUF_PREFIX to the GGUF files start, e.g. /work/gguf/ for /work/gguf/124m-f32.gguf}
MODELS=${MODELS:-124m}
DTYPES=${DTYPES:-f32}
PROMPTS=${PROMPTS:-6,128,512,900}
NEW_TOKENS=${NEW_TOKENS:-30}
SEQUENCES=${SEQUENCES:-1,2,4,8,16}
THREADS=${THREADS:-2}
REPS=${REPS:-3}
OURS=${OURS:-0}
THROUGHPUT=${THROUGHPUT:-target/release/throughput}

for tool in llama-bench llama-batched-bench; do
    [[ -x $BIN/$tool ]] || { echo "error: $BIN/$tool not found: build it (docs/llama-cpp.md)" >&2; exit 1; }
done
mkdir -p "$OUT"

# The largest of a comma-separated list.
max_of() { tr ',' '\n' <<<"$1" | sort -n | tail -1; }
# Our weight format measured against a GGUF type.
ours_dtype() {
    case $1 in
        f32) echo f32 ;; f16 | bf16) echo bf16 ;; q8_0) echo int8 ;;
        *) echo "error: no counterpart of GGUF type $1 among ours (f32, f16, q8_0)" >&2; exit 1 ;;
    esac
}

# llama-batched-bench keeps every sequence's cache in one context of -c cells: room for the
# largest shape, each sequence its own prompt (no -pps, as each of our requests has its own).
CTX=$(( $(max_of "$SEQUENCES") * ($(max_of "$PROMPTS") + NEW_TOKENS) ))

for model in ${MODELS//,/ }; do
    for dtype in ${DTYPES//,/ }; do
        gguf=$PREFIX$model-$dtype.gguf
        [[ -f $gguf ]] || { echo "error: $gguf not found (convert it: docs/llama-cpp.md)" >&2; exit 1; }
        name=$model-$dtype
        echo "== $name: llama-bench" >&2
        "$BIN/llama-bench" -m "$gguf" -p "$PROMPTS" -n "$NEW_TOKENS" -r "$REPS" -t "$THREADS" -o json \
            >"$OUT/llama-bench_$name.json" 2>"$OUT/llama-bench_$name.log"
        echo "== $name: llama-batched-bench" >&2
        "$BIN/llama-batched-bench" -m "$gguf" -c "$CTX" -b 2048 -ub 512 -t "$THREADS" -tb "$THREADS" \
            -npp "$PROMPTS" -ntg "$NEW_TOKENS" -npl "$SEQUENCES" --output-format jsonl \
            >"$OUT/llama-batched-bench_$name.jsonl" 2>"$OUT/llama-batched-bench_$name.log"
    done
done
echo "wrote $OUT; compare: throughput compare --out-dir $OUT $OUT [$OUT/ours or OUR_REPORT.json ...]" >&2

[[ $OURS == 1 ]] || exit 0
# One run of ours, its tables (also written to OUT_DIR/ours) not printed. Exit status 3 (the
# report written, the reference study's targets missed) is not a failure here.
ours() { "$THROUGHPUT" "$@" >/dev/null || [[ $? == 3 ]]; }
# Our side of the same shapes: the concurrency curve per model, type and prompt length.
common=(--mode batched --max-new-tokens "$NEW_TOKENS" --threads-per-request "$THREADS" --out-dir "$OUT/ours")
for model in ${MODELS//,/ }; do
    for dtype in ${DTYPES//,/ }; do
        for prompt in ${PROMPTS//,/ }; do
            echo "== ours: $model $(ours_dtype "$dtype") prompt $prompt" >&2
            ours --weights "weights/synthetic/$model-seed0" --dtype "$(ours_dtype "$dtype")" \
                --prompt-tokens "$prompt" --levels "${SEQUENCES#1,}" "${common[@]}"
        done
    done
done
# The context and family axes in one run each, where this throughput sweeps.
sweeps=(
    "--weights weights/synthetic/${MODELS%%,*}-seed0 --sweep prompt-tokens=$PROMPTS --levels 1"
    "--sweep model=$MODELS --prompt-tokens ${PROMPTS%%,*} --levels 1"
)
help=$("$THROUGHPUT" --help)
for s in "${sweeps[@]}"; do
    if [[ $help == *--sweep* ]]; then
        # shellcheck disable=SC2086 # the sweep's flags are words
        ours $s "${common[@]}"
    else
        echo "skipped (this throughput has no --sweep): $THROUGHPUT $s ${common[*]}" >&2
    fi
done
