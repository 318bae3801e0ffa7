#!/usr/bin/env bash
# The test suite: unit, parity (golden tensors from ../shared/golden or $COLT5_GOLDEN_DIR),
# gradient, property and CLI tests, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace "$@"
