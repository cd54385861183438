#!/usr/bin/env bash
# Install (with test extras), then run the whole test suite: rewards, data, real-weight
# model parity, LoRA, sharding on 8 fake CPU devices.
#   bash scripts/test.sh          everything (what CI runs)
#   bash scripts/test.sh --fast   the inner loop: no install, tests not marked `slow` (under 2 min on 2 cores)
# Extra arguments go to pytest (e.g. -k sampler). Two pytest workers share the machine (TEST_WORKERS=N to
# change); each test file runs whole in one worker, so a module's fixtures are built once. Tests marked
# `serial` (several processes that must meet within a deadline, libtpu's lock) run afterwards, alone.
set -euo pipefail
cd "$(dirname "$0")/.."
workers=(-n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)  # heavy files first: conftest
if [[ "${1:-}" == "--fast" ]]; then
  shift
  exec python -m pytest tests -p no:cacheprovider "${workers[@]}" -m "not slow" "$@"
fi
bash scripts/install.sh
python -m pip install -q -e ".[test]"
status=0
python -m pytest tests -p no:cacheprovider "${workers[@]}" -m "not serial" --durations=20 "$@" || status=$?
serial=0
python -m pytest tests -p no:cacheprovider -m serial --durations=5 "$@" || serial=$?
(( serial == 5 )) && serial=0  # pytest's "no tests collected": the arguments selected no serial test
exit $(( status ? status : serial ))
