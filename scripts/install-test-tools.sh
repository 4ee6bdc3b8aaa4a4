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

# protoc plugins for the Go example client (examples/clients/go), pinned like ghz. protoc
# itself is grpcio-tools' (python -m grpc_tools.protoc, in .venv).
go_install_pinned() {  # binary, module whose version go records, package@version
  local binary=$1 module=$2 package=$3 version=${3##*@}
  if [ -x ".tools/bin/$binary" ] && go version -m ".tools/bin/$binary" 2>/dev/null \
      | grep -q "mod[[:space:]]*${module}[[:space:]]*${version}"; then
    return 0
  fi
  GOBIN="$PWD/.tools/bin" go install "$package"
}
if command -v go >/dev/null; then
  go_install_pinned protoc-gen-go google.golang.org/protobuf \
    google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
  go_install_pinned protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc \
    google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
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
# (scripts/perf-analyzer-requirements.txt says why). It links Debian's libb64 and CUDA's
# runtime library; .tools/bin/perf_analyzer is a wrapper that finds the latter.
if ! dpkg -s libb64-0d >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d
  else
    echo "install-test-tools: libb64-0d missing; run as root, or: sudo apt-get install libb64-0d" >&2
  fi
fi
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

# Prometheus and promtool (Debian's `prometheus` package ships both), for the metrics
# tests: promtool checks the exposition text, and a Prometheus server started by the test
# on loopback scrapes Ferry. The package would also start a system service where systemd
# runs; the tests need none, so it is stopped and disabled.
if ! { command -v prometheus >/dev/null && command -v promtool >/dev/null; }; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
    if [ -d /run/systemd/system ]; then
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  else
    echo "install-test-tools: prometheus/promtool missing; run as root, or:" \
      "sudo apt-get install prometheus" >&2
  fi
fi
