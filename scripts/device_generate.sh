#!/usr/bin/env bash
# Run on a CUDA machine from the repository root, with `.device/colt5[.xz]` (a release build
# with `--features cuda`) and `.device/shared/` as for device_block.sh. In one call:
# `colt5 bench generate --backend cuda` (batches 1 and 8, a one-token prompt, $LENGTH new
# tokens) beside the reference's bench_generate.py. Writes the tables to $OUT (or ./bench-out).
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
length=${LENGTH:-512}
.device/colt5 bench generate --backend cuda --configs small small-cd recipe-cd small-colt5 \
    --batch 1 8 --prompt-len 1 --length "$length" 2>&1 | grep -v -E "INFO|WARN" | tee "$out/colt5_generate_gpu.md"
(cd .device/shared/bench && python3 bench_generate.py --device cuda --configs small-cd recipe-cd \
    --length "$length") 2>&1 | tee "$out/reference_generate_gpu.md"
