#!/usr/bin/env bash
# Install the external tools that integration tests drive, into .tools/ (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools/bin

# ghz, the gRPC load generator the benchmarks (and their smoke test) drive. Pinned; rebuilt
# only when the installed binary is another version. Needs Go (https://go.dev/dl/).
GHZ_VERSION=v0.120.0
if ! { [ -x .tools/bin/ghz ] && go version -m .tools/bin/ghz 2>/dev/null \
    | grep -q "mod[[:space:]]*github.com/bojand/ghz[[:space:]]*${GHZ_VERSION}"; }; then
  if command -v go >/dev/null; then
    GOBIN="$PWD/.tools/bin" go install "github.com/bojand/ghz/cmd/ghz@${GHZ_VERSION}"
  else
    echo "install-test-tools: Go not found, skipping ghz (the benchmark smoke test will skip)" >&2
  fi
fi
