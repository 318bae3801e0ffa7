#!/usr/bin/env bash
# Run on a CUDA machine from the repository root, with `.device/` holding a release `colt5`
# built with `--features cuda`, the GPU test binaries (`.device/kernels`, `.device/gpu`)
# and copies of ../shared/bench and ../shared/reference under `.device/shared/` (binaries
# may be xz-compressed, `.device/NAME.xz`). Writes to $OUT (or ./bench-out): the GPU tests,
# `colt5 bench block --profile` beside the reference's bench_block.py, and the CoLT5 LM's
# training steps at 4 096 to 65 536 tokens.
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
for packed in .device/*.xz; do
    [ -e "$packed" ] && xz -dkf "$packed" && chmod +x "${packed%.xz}"
done
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader | tee "$out/device.txt"
[ -x .device/kernels ] && timeout 120 .device/kernels --test-threads 1 top_k 2>&1 | tail -4 | tee "$out/kernel_tests.txt"
[ -x .device/gpu ] && timeout 120 .device/gpu --nocapture 2>&1 | tail -6 | tee "$out/gpu_tests.txt"
timeout 240 .device/colt5 bench block ${BLOCK_ARGS:---profile} 2>&1 | tee "$out/colt5_block.md"
(cd .device/shared/bench && PYTHONUNBUFFERED=1 timeout 200 python3 bench_block.py --dtypes fp32 bf16 --models colt5_triton dense_sdpa) 2>&1 | tee "$out/reference_block.md"
timeout 200 .device/colt5 bench lm --backend cuda --configs colt5 --batch 1 --steps 3 --seq-len ${LM_SEQS:-4096 16384 65536} 2>&1 | tee "$out/colt5_lm_long.md"
