#!/usr/bin/env bash
# Build the tpu_reason wheel (recipes inside, as tpu_reason.recipes) into OUT_DIR (default: dist/).
# It builds a copy of the sources, so no build/ folder or stale module lands in the checkout or the wheel.
# On Kaggle: upload the .whl as a dataset and add it to the notebook (README: Run on Kaggle).
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-dist}")"
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md tpu_reason recipes | tar -x -C "$src"
python -m pip wheel -q --no-deps -w "$out" "$src"
ls "$out"/tpu_reason-*.whl
