#!/usr/bin/env bash
# The test suite: unit, parity (golden tensors from ../shared/golden or $COLT5_GOLDEN_DIR),
# gradient, property and CLI tests, on CPU; then the fused GPU kernels against the CPU
# implementation, on CubeCL's wgpu runtime (lavapipe, software Vulkan).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace "$@"
cargo test -p colt5 --features wgpu --test kernels --test gpu --test fused_attention "$@"
