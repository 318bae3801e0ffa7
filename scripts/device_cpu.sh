#!/usr/bin/env bash
# Run on the device machine from the repository root, with `.device/` holding a release
# `colt5` (any features; `.device/colt5.xz` compressed is fine) and copies of
# ../shared/bench and ../shared/reference under `.device/shared/`. On two pinned cores
# (`taskset -c 0,1`), in one call: `colt5 bench lm` beside bench_cpu_lm.py and
# `colt5 bench generate` beside bench_generate.py. Writes the tables to $OUT (or ./bench-out).
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
lscpu | grep "Model name" | tee "$out/cpu.txt"
bench=.device/shared/bench
taskset -c 0,1 .device/colt5 bench lm --steps 3 --configs small-cd small-dense small-colt5 small 2>&1 | tee "$out/colt5_lm.md"
(cd $bench && taskset -c 0,1 python3 bench_cpu_lm.py --threads 2 --steps 3 --configs small-cd small-dense) 2>&1 | tee "$out/reference_lm.md"
taskset -c 0,1 .device/colt5 bench generate --configs small small-cd --batch 1 8 --prompt-len 1 --length 256 2>&1 | tee "$out/colt5_generate.md"
(cd $bench && taskset -c 0,1 python3 bench_generate.py --device cpu --configs small-cd --length 256) 2>&1 | tee "$out/reference_generate.md"
