#!/usr/bin/env bash
# Run on a CUDA machine from the repository root, with `.device/` holding release `colt5`
# binaries built with `--features cuda` (named in $BINARIES, default `colt5`; each may be
# xz-compressed, `.device/NAME.xz`) and copies of ../shared/bench and ../shared/reference
# under `.device/shared/`; with the GPU test binaries `.device/kernels`, `.device/gpu`,
# `.device/fused_attention` and `.device/matmul` (`cargo test --release -p colt5 --features
# cuda --test kernels --test gpu --test fused_attention --test matmul --no-run`) it runs the
# top-k kernel test, the models', the fused attention's and cuBLAS's GPU-vs-CPU tests first. Writes to $OUT (or ./bench-out), for
# each binary, `colt5 bench block --profile` in each of $PRECISIONS (default f32 bf16) and
# the CoLT5 LM's training steps at 4 096 to 65 536 tokens, and once the reference's
# bench_block.py (fp32, bf16 autocast and bf16 weights; between the two), in one call.
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader | tee "$out/device.txt"
[ -x .device/kernels ] && timeout 120 .device/kernels --test-threads 1 top_k 2>&1 | tail -4 | tee "$out/kernel_tests.txt"
[ -x .device/gpu ] && timeout 120 .device/gpu --nocapture 2>&1 | tail -6 | tee "$out/gpu_tests.txt"
[ -x .device/fused_attention ] && timeout 120 .device/fused_attention --nocapture 2>&1 | tail -50 | tee "$out/fused_attention_tests.txt"
[ -x .device/matmul ] && timeout 120 .device/matmul --nocapture --test-threads 1 2>&1 | tail -20 | tee "$out/matmul_tests.txt"
for bin in ${BINARIES:-colt5}; do
    for precision in ${PRECISIONS:-f32 bf16}; do
        echo "## $bin, $precision"
        timeout 300 ".device/$bin" bench block --precision "$precision" ${BLOCK_ARGS:---profile} 2>&1 |
            tee "$out/${bin}_block_$precision.md"
    done
done
(cd .device/shared/bench && PYTHONUNBUFFERED=1 timeout 200 python3 bench_block.py --dtypes ${REFERENCE_DTYPES:-fp32 bf16 bf16w} --models colt5_triton dense_sdpa) 2>&1 | tee "$out/reference_block.md"
for bin in ${BINARIES:-colt5}; do
    timeout 200 ".device/$bin" bench lm --backend cuda --configs colt5 --batch 1 --steps 3 \
        --seq-len ${LM_SEQS:-4096 16384 65536} 2>&1 | tee "$out/${bin}_lm.md"
done
