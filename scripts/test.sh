#!/usr/bin/env bash
# Install (with test extras), then run the whole test suite: rewards, data, real-weight
# model parity, LoRA, sharding on 8 fake CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pip install -q -e ".[test]"
python -m pytest tests -p no:cacheprovider
