#!/usr/bin/env bash
# Create .venv and install Ferry with pinned dependencies.
#   scripts/setup.sh            runtime only (onnxruntime for the CPU)
#   scripts/setup.sh test       plus everything the tests, linters and benchmarks use
# Once installed, a later run does nothing until pyproject.toml or constraints.txt change
# (so scripts/serve-example.sh starts again without a network); rm -rf .venv starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu"
[ "${1:-}" = "test" ] && extras="cpu,test"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# One line per install that finished: the pins' checksum and the extras. The test extras
# hold the runtime ones. (Ferry itself is editable: its code needs no reinstall.)
stamp=.venv/.ferry-setup
pins="$(cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)"
installed() { [ -f "$stamp" ] && grep -qxF "$pins $1" "$stamp"; }
if installed "$extras"; then exit 0; fi
if [ "$extras" = cpu ] && installed "cpu,test"; then exit 0; fi
echo "setup: installing Ferry and its pinned dependencies into .venv (takes a while the first time)" >&2
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[${extras}]"
echo "$pins $extras" >> "$stamp"
