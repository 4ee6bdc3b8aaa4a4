#!/usr/bin/env bash
# Install the external tools that integration tests drive (idempotent). What it writes:
#   .tools/bin/   ghz, grpcurl, protoc-gen-go, protoc-gen-go-grpc (built with Go), the
#                 perf_analyzer wrapper
#   .tools/perf-venv/                       perf_analyzer's own venv (tritonclient 2.41.0)
#   examples/clients/node/node_modules/     the Node.js client's packages (npm ci)
#   Go's and npm's download caches in your home folder (go env GOMODCACHE, ~/.npm)
# and, as root, Debian packages system-wide: scripts/install-system-tools.sh, skipped with
# FERRY_SKIP_SYSTEM_TOOLS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools/bin

# ghz, the gRPC load generator the benchmarks (and their smoke test) drive. Pinned; rebuilt
# only when the installed binary is another version. Needs Go (https://go.dev/dl/).
GHZ_VERSION=v0.120.0
if ! { [ -x .tools/bin/ghz ] && go version -m .tools/bin/ghz 2>/dev/null \
    | grep -q "mod[[:space:]]*github.com/bojand/ghz[[:space:]]*${GHZ_VERSION}"; }; then
  if command -v go >/dev/null; then
    # -X main.version: what `ghz --version` prints (a plain go install says "dev").
    GOBIN="$PWD/.tools/bin" go install -ldflags "-X main.version=${GHZ_VERSION}" \
      "github.com/bojand/ghz/cmd/ghz@${GHZ_VERSION}"
  else
    echo "install-test-tools: Go not found, skipping ghz (the benchmark smoke test will skip)" >&2
  fi
fi

# protoc plugins for the Go example client (examples/clients/go), pinned like ghz. protoc
# itself is grpcio-tools' (python -m grpc_tools.protoc, in .venv).
go_install_pinned() {  # binary, module whose version go records, package@version [go flags]
  local binary=$1 module=$2 package=$3 version=${3##*@}
  if [ -x ".tools/bin/$binary" ] && go version -m ".tools/bin/$binary" 2>/dev/null \
      | grep -q "mod[[:space:]]*${module}[[:space:]]*${version}"; then
    return 0
  fi
  GOBIN="$PWD/.tools/bin" go install "${@:4}" "$package"
}
if command -v go >/dev/null; then
  go_install_pinned protoc-gen-go google.golang.org/protobuf \
    google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
  go_install_pinned protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc \
    google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
  # grpcurl: what a person types at Ferry; the tests check its JSON requests and answers.
  # -X main.version: what `grpcurl -version` prints (a plain go install says "dev build").
  go_install_pinned grpcurl github.com/fullstorydev/grpcurl \
    github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3 -ldflags "-X main.version=v1.9.3"
  (cd examples/clients/go && go mod download)
else
  echo "install-test-tools: Go not found, skipping the Go client's tools" >&2
fi

# The Node.js example client's dependencies, exactly as its package-lock.json pins them.
if command -v npm >/dev/null; then
  node_dir=examples/clients/node
  if ! [ "$node_dir/node_modules/.package-lock.json" -nt "$node_dir/package-lock.json" ]; then
    npm ci --prefix "$node_dir" --no-audit --no-fund --loglevel=error
  fi
else
  echo "install-test-tools: npm not found, skipping the Node.js client's packages" >&2
fi

# Triton's perf_analyzer, from the tritonclient 2.41.0 wheel, in a venv of its own
# (scripts/perf-analyzer-requirements.txt says why). It links Debian's libb64 (from
# scripts/install-system-tools.sh) and CUDA's runtime library; .tools/bin/perf_analyzer is a
# wrapper that finds the latter.
perf_requirements=scripts/perf-analyzer-requirements.txt
if ! [ .tools/perf-venv/.installed -nt "$perf_requirements" ]; then
  rm -rf .tools/perf-venv
  python3 -m venv .tools/perf-venv
  .tools/perf-venv/bin/python -m pip install --quiet -r "$perf_requirements"
  touch .tools/perf-venv/.installed
fi
cat > .tools/bin/perf_analyzer <<'WRAPPER'
#!/usr/bin/env bash
# Runs the perf_analyzer from .tools/perf-venv with CUDA's runtime library on the path.
venv="$(cd "$(dirname "$0")/../perf-venv" && pwd)"
cudart="$(echo "$venv"/lib/python3*/site-packages/nvidia/cuda_runtime/lib)"
export LD_LIBRARY_PATH="$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$venv/bin/perf_analyzer" "$@"
WRAPPER
chmod +x .tools/bin/perf_analyzer

# Debian packages, system-wide: libb64-0d (perf_analyzer) and prometheus (promtool and a
# Prometheus server that tests/test_prometheus.py starts on loopback to scrape Ferry).
scripts/install-system-tools.sh
