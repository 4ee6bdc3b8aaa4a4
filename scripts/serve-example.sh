#!/usr/bin/env bash
# Set everything up, then serve the bundled example model (digits classifier) on
# gRPC port 8001 and REST port 8000, with Prometheus metrics on port 8002. Extra arguments
# go to `ferry serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/ferry serve examples/model_repository "$@"
