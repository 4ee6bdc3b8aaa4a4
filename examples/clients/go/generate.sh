#!/usr/bin/env bash
# Regenerate the Go stubs in inference/ from Ferry's proto/ (run after editing a .proto file;
# tests/test_clients_go_node.py fails while the committed stubs are stale).
#   examples/clients/go/generate.sh [OUT_DIR]     default: examples/clients/go/inference
# Needs scripts/setup.sh test (grpcio-tools' protoc) and scripts/install-test-tools.sh
# (pinned protoc-gen-go and protoc-gen-go-grpc in .tools/bin).
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
out="${1:-$root/examples/clients/go/inference}"
# proto/ declares no go_package; these mappings give both files one Go package here
# without editing the shared wire contract.
pkg="ferry.example/digitsclient/inference"
maps=()
for file in grpc_service.proto model_config.proto; do
  maps+=("--go_opt=M$file=$pkg" "--go-grpc_opt=M$file=$pkg")
done
mkdir -p "$out"
PATH="$root/.tools/bin:$PATH" "$root/.venv/bin/python" -m grpc_tools.protoc \
  --proto_path="$root/proto" \
  --go_out="$out" --go_opt=paths=source_relative \
  --go-grpc_out="$out" --go-grpc_opt=paths=source_relative \
  "${maps[@]}" \
  grpc_service.proto model_config.proto
