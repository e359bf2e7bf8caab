#!/usr/bin/env bash
# The whole test suite: lint (rustfmt, clippy, ruff), Rust unit/property tests, Python tests with
# coverage (>= 90%), the examples, and the tch feature against libtorch from torch 2.13.0 (its own venv).
# Set SKIP_TCH=1 to leave out the tch part (it downloads torch 2.13.0 and compiles torch-sys).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run scripts/setup.sh first" >&2; exit 1; }

echo "== lint (cargo fmt, clippy, ruff)"
cargo fmt --check
(cd fuzz && cargo fmt --check)
cargo clippy --release --all-targets --features python --quiet -- -D warnings
"$PY" -m ruff check python tests examples benchmarks fuzz

echo "== cargo test (pure Rust, no Python, no libtorch)"
cargo test --release --quiet

echo "== pytest (Python package, coverage)"
"$PY" -m pytest -q --durations=15 --cov=diffulex_edge --cov-report=term --cov-fail-under=90 tests/

echo "== examples (every one; the slow ones with small settings)"
EX_OUT=$(mktemp -d)
trap 'rm -rf "$EX_OUT"' EXIT
"$PY" examples/quickstart.py
"$PY" examples/export_gguf_tiny_llama.py "$EX_OUT/tiny.gguf"
"$PY" examples/calibrate_tiny_llama.py --samples 128 --seq-len 64 --max-tokens 8192
"$PY" examples/train_tiny_lm.py --out "$EX_OUT/tiny-lm" --steps 10

if [ "${SKIP_TCH:-0}" != "1" ]; then
    echo "== tch feature (libtorch from torch 2.13.0)"
    bash .ci/tch.sh
fi
echo "== all tests passed"
