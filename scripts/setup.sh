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
# The GPU kernel tests also run on CPU through CubeCL's wgpu runtime on lavapipe, Mesa's
# software Vulkan driver.
if [ ! -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ]; then
    echo "installing Mesa's software Vulkan driver (lavapipe) for the kernel tests" >&2
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get install -y --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null \
        || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null; }
fi
