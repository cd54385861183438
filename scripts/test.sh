#!/usr/bin/env bash
# Install (with test extras), then run the whole test suite: rewards, data, real-weight
# model parity, LoRA, sharding on 8 fake CPU devices.
#   bash scripts/test.sh          everything (what CI runs)
#   bash scripts/test.sh --fast   the inner loop: no install, tests not marked `slow` (a few minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fast" ]]; then
  shift
  exec python -m pytest tests -p no:cacheprovider -m "not slow" "$@"
fi
bash scripts/install.sh
python -m pip install -q -e ".[test]"
python -m pytest tests -p no:cacheprovider "$@"
