#!/usr/bin/env bash
# Create .venv and install diffulex-edge (Rust core built by maturin) with its test extras.
# Everything comes from the package registries (PyPI, crates.io); needs python3 and cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --upgrade --quiet pip
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import diffulex_edge; print('diffulex-edge', diffulex_edge.__version__, 'installed; kernels:', diffulex_edge.kernel_info())"
