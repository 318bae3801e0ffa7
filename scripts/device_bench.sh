#!/usr/bin/env bash
# Run on a CUDA machine from the repository root, with `.device/` holding a release `colt5`
# built with `--features cuda`, the kernel test binary (`.device/kernels`) and copies of
# ../shared/bench and ../shared/reference under `.device/shared/` (the binaries may be
# xz-compressed, `.device/colt5.xz`, to fit a transfer). Writes the tables to $OUT (or
# ./bench-out): the kernel tests, `colt5 bench cd` beside the reference's
# bench_coor_descent.py and bench_accuracy.py, and with the argument `lm`, `colt5 bench lm`
# beside bench_cpu_lm.py on the same two cores.
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
.device/kernels --test-threads 1 --nocapture > "$out/kernel_tests.txt" 2>&1
tail -3 "$out/kernel_tests.txt"
.device/colt5 bench cd 2>&1 | tee "$out/colt5_cd.md"
(cd .device/shared/bench && PYTHONUNBUFFERED=1 python3 bench_coor_descent.py) 2>&1 | tee "$out/reference_cd.md"
(cd .device/shared/bench && PYTHONUNBUFFERED=1 python3 bench_accuracy.py) 2>&1 | tail -20 | tee "$out/reference_accuracy.txt"
[ "${1:-}" = lm ] || exit 0
taskset -c 0,1 .device/colt5 bench lm --steps 3 --configs small-cd small-dense small-colt5 2>&1 | tee "$out/colt5_lm.md"
(cd .device/shared/bench && PYTHONUNBUFFERED=1 taskset -c 0,1 python3 bench_cpu_lm.py --threads 2 --steps 3 --configs small-cd small-dense) 2>&1 | tee "$out/reference_lm.md"
