#!/usr/bin/env bash
# The AVX-512 check of issue 22, in one short call on a machine that has
# AVX-512 (about 5 minutes on 16 cores; fails at once on a CPU without it):
#   1. builds the workspace in release (for baseline x86-64, as always);
#   2. runs the kernel tests, which run every kernel set the CPU supports, and
#      requires avx512, avx2 and portable to be among them (a CPU without
#      AVX-512 fails here instead of passing without running it);
#   3. runs the root crate's reference, precision and batching tests on the
#      AVX-512 set, then on AVX2;
#   4. times the kernels at the rows that matter (1, 8, 128; f32, bf16, int8;
#      attention) on avx512 and avx2, alternating;
#   5. runs `throughput --probe --levels 1,8` on the default (best) set.
# Usage: kernels/run_avx512_check.sh [OUT_DIR]   (default: ./avx512-check)
# Set CARGO_FLAGS=--offline where the machine has no network.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-avx512-check}
mkdir -p "$out"
flags=${CARGO_FLAGS:-}
step() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$out/steps.txt"; }

step "cpu"
grep -m1 "model name" /proc/cpuinfo | tee "$out/cpu.txt"
grep -m1 -o -w -E "avx512(f|bw|dq|vl|_vnni|_bf16)" /proc/cpuinfo | sort -u | tr '\n' ' ' | tee -a "$out/cpu.txt"
echo

step "build"
cargo build --release $flags --workspace --all-targets 2>&1 | tail -3

step "kernel tests, every supported set (avx512, avx2 and portable required)"
GPT2_REQUIRE_KERNELS=avx512,avx2,portable \
  cargo test --release $flags -p gpt2-kernels -- --nocapture 2>&1 | tee "$out/kernel-tests.txt" |
  grep -E "NOTICE|test result|FAILED|panicked" || true
grep -q "test result: ok" "$out/kernel-tests.txt" && ! grep -q "FAILED" "$out/kernel-tests.txt"

for set in avx512 avx2; do
  step "root reference/precision/batching tests on $set"
  GPT2_KERNELS=$set cargo test --release $flags --test reference --test precision --test batching \
    2>&1 | tee "$out/root-tests-$set.txt" | grep -E "test result|FAILED|panicked" || true
  ! grep -q "FAILED\|panicked" "$out/root-tests-$set.txt"
done

step "kernel timings, avx512 and avx2 alternating"
bench=$(cargo bench $flags -p gpt2-kernels --bench kernels --no-run 2>&1 | grep -o 'target/[^)]*kernels-[0-9a-f]*' | tail -1)
for round in 1 2; do
  for set in avx512 avx2; do
    for f in "linear mlp_up" "attention_head hd=64 t=1024"; do
      GPT2_KERNELS=$set "$bench" "$f" >> "$out/bench-$set.txt" 2>&1
    done
  done
done
grep -h -E "kernels:|M=(1|8|128)( |$)|attention" "$out"/bench-avx512.txt | head -40

step "throughput --probe --levels 1,8 (best set)"
timeout 240 cargo run --release $flags --bin throughput -- --probe --levels 1,8 2>&1 | tee "$out/probe.txt" | tail -40

step "done: results in $out/"
