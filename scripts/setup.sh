#!/usr/bin/env bash
# Makes sure the tools the build needs are present. colt5 needs only a Rust toolchain
# (stable, with rustfmt and clippy for the checks); the CUDA backend compiles its kernels at
# run time through NVRTC, so no CUDA toolkit is needed to build it.
set -euo pipefail
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: installing the stable Rust toolchain with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    # shellcheck disable=SC1091
    source "$HOME/.cargo/env"
fi
if command -v rustup >/dev/null 2>&1; then
    rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
