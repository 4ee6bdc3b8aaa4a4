#!/usr/bin/env bash
# Install the external tools that integration tests drive, into .tools/ (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools/bin
