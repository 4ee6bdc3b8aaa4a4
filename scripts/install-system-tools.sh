#!/usr/bin/env bash
# The system-wide part of the test tools: Debian packages, installed with apt-get as root.
# Everything else the tests drive lives in the repository (.venv/, .tools/, node_modules/)
# and comes from scripts/setup.sh and scripts/install-test-tools.sh.
#   libb64-0d    the base64 library that Triton's perf_analyzer links (tests/test_perf_analyzer.py)
#   prometheus   prometheus and promtool (tests/test_prometheus.py). Debian's package depends on
#                about ten libjs-* packages (its web UI), which --no-install-recommends cannot
#                leave out, and enables a systemd unit, which is disabled again here.
# FERRY_SKIP_SYSTEM_TOOLS=1 installs none of it: the tests that need it then skip, saying why
# (with CI set they fail instead). Nothing is done for packages already there.
set -euo pipefail

packages=()
dpkg -s libb64-0d >/dev/null 2>&1 || packages+=(libb64-0d)
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || packages+=(prometheus)
if [ "${#packages[@]}" = 0 ]; then
  exit 0
fi
if [ "${FERRY_SKIP_SYSTEM_TOOLS:-}" = 1 ]; then
  echo "install-system-tools: FERRY_SKIP_SYSTEM_TOOLS=1, not installing ${packages[*]};" \
    "the tests that need them will skip" >&2
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-system-tools: ${packages[*]} missing; run as root, or:" \
    "sudo apt-get install --no-install-recommends ${packages[*]}" \
    "(FERRY_SKIP_SYSTEM_TOOLS=1 skips this step)" >&2
  exit 0
fi
echo "install-system-tools: installing Debian packages system-wide: ${packages[*]}" \
  "(FERRY_SKIP_SYSTEM_TOOLS=1 skips this step)" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
if [[ " ${packages[*]} " == *" prometheus "* ]]; then
  # The tests start their own Prometheus on loopback; the system service is not wanted.
  if [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  elif command -v deb-systemd-helper >/dev/null 2>&1; then
    deb-systemd-helper disable prometheus.service >/dev/null 2>&1 || true
  fi
fi
