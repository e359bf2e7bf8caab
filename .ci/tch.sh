#!/usr/bin/env bash
# Build and test the `tch` feature against the libtorch that tch 0.26 pins (PyTorch 2.13.0).
#
# libtorch comes from the PyPI torch wheel in a private venv (.venv-tch) rather than a separate
# libtorch download: torch-sys' build script asks that venv's Python for include/lib paths and the
# C++ ABI when LIBTORCH_USE_PYTORCH=1. The Linux wheel pulls the CUDA runtime wheels in as
# dependencies; they are only loaded lazily, so everything here runs on CPU.
#
# Idempotent: the venv is reused when it already holds torch 2.13.0. Builds go to target/tch so
# they do not invalidate the main (feature-less) build in target/.
set -euo pipefail

TORCH_VERSION=2.13.0 # must equal TORCH_VERSION in torch-sys-0.26.0/build.rs
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-tch"
PYTHON_BIN="${PYTHON:-python3}"

cd "$ROOT"

installed_torch() {
    "$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true
}

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "==> creating $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
if [[ "$(installed_torch)" != "$TORCH_VERSION" ]]; then
    echo "==> installing torch==$TORCH_VERSION into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # setuptools: torch-sys' build script imports torch.utils.cpp_extension, which imports it, and
    # venvs on Python >= 3.12 no longer ship it.
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" numpy setuptools
else
    echo "==> reusing $VENV (torch $TORCH_VERSION)"
fi

# torch-sys runs `python` (not `python3`) when VIRTUAL_ENV is set, so activate the venv the way
# `source bin/activate` would: both names then resolve to the venv's interpreter.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# The version check in torch-sys passes for the pinned torch, so LIBTORCH_BYPASS_VERSION_CHECK is
# deliberately not set: a mismatch should fail loudly here, not at run time.
unset LIBTORCH_BYPASS_VERSION_CHECK LIBTORCH LIBTORCH_LIB LIBTORCH_INCLUDE
TORCH_LIB="$("$VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
# The test and example binaries link libtorch_cpu.so / libc10.so dynamically from the wheel.
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR="$ROOT/target/tch"

echo "==> python: $(command -v python) ($(python -c 'import torch; print("torch", torch.__version__)'))"
echo "==> LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# One (release) profile for the tests and the example, so torch-sys' C++ is compiled only once.
echo "==> cargo test --release --features tch --test tch_linear"
cargo test --release --features tch --test tch_linear

echo "==> cargo run --release --features tch --example tch_quantized_linear"
cargo run --release --features tch --example tch_quantized_linear

echo "==> tch feature OK"
