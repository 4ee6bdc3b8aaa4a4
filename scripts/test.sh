#!/usr/bin/env bash
# Set everything up, then run the whole test suite: lint, type checks and pytest.
#   scripts/test.sh                 everything
#   scripts/test.sh -m "not slow"   extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
scripts/install-test-tools.sh
export PATH="$PWD/.tools/bin:$PATH"

echo "== ruff"
.venv/bin/ruff check server client tests benchmarks examples proto/generate.py proto/codec.py
echo "== mypy"
# mypy sees the installed package layout (ferry.server, ...) through symlinks.
mkdir -p .typecheck/ferry
for pkg in server client proto; do ln -sfn "../../$pkg" ".typecheck/ferry/$pkg"; done
(cd .typecheck && ../.venv/bin/mypy -p ferry.server -p ferry.client)
echo "== import contracts"
# The layers written down in pyproject.toml ([tool.importlinter]); a new violation fails here.
.venv/bin/lint-imports --no-cache
echo "== pytest"
# The 20 slowest tests are listed at the end: where the suite's time goes, run after run.
.venv/bin/python -m pytest --durations=20 "$@"
echo "== pytest, the in-process core on the standard library's event loop (--event-loop asyncio)"
# The run above is on uvloop, the servers' default; these cover the other loop.
FERRY_TEST_EVENT_LOOP=asyncio .venv/bin/python -m pytest -q \
    tests/test_scheduler.py tests/test_event_loop.py tests/test_batching_e2e.py \
    tests/test_reliability.py tests/test_shutdown.py tests/test_streams_backpressure.py \
    tests/test_handoff.py tests/test_rest.py tests/test_security.py
