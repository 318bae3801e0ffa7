#!/usr/bin/env bash
# Run on a CUDA machine from the repository root, with `.device/colt5[.xz]` (a release build
# with `--features cuda`) and `.device/shared/` as for device_block.sh. Records with Nsight
# Compute the kernels of one forward+backward of the CoLT5 block (`bench block
# --profiler-range`) at each length in $SEQS and sums them by kernel and by class
# (scripts/ncu_summary.py). Writes to $OUT (or ./bench-out).
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
for seq in ${SEQS:-65536}; do
    timeout 300 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \
        --csv --page raw --log-file "$out/ncu_$seq.csv" \
        .device/colt5 bench block --seqs "$seq" --models ${MODELS:-colt5} --reps 2 --profiler-range \
        > "$out/ncu_${seq}_bench.txt" 2>&1
    echo "## kernels of one forward+backward at $seq tokens"
    python3 scripts/ncu_summary.py "$out/ncu_$seq.csv" ${TOP:-45}
done
