#!/usr/bin/env bash
# The whole benchmark in one command: set up the venv and ghz, then run every part.
#   benchmarks/run.sh                  full run (about 6 minutes on 2 cores), into benchmarks/results/
#   benchmarks/run.sh --smoke          a few seconds, into benchmarks/.work/smoke/
# Other arguments go to `python -m benchmarks.run` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
scripts/install-test-tools.sh
exec .venv/bin/python -m benchmarks.run "$@"
