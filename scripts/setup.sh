#!/usr/bin/env bash
# Create .venv and install Ferry with pinned dependencies.
#   scripts/setup.sh            runtime only (onnxruntime for the CPU)
#   scripts/setup.sh test       plus everything the tests, linters and benchmarks use
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu"
[ "${1:-}" = "test" ] && extras="cpu,test"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[${extras}]"
