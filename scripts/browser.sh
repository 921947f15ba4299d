#!/usr/bin/env bash
# The browser the dashboard tests drive: Debian's chromium and chromium-driver (nothing is
# downloaded by the tests themselves). Installs them when missing; needs root or sudo for apt.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  run=()
elif command -v sudo >/dev/null 2>&1; then
  run=(sudo)
else
  echo "browser: chromium and chromium-driver are missing and apt needs root; install them, e.g." \
       "'apt-get install -y chromium chromium-driver'" >&2
  exit 1
fi
echo "browser: installing chromium and chromium-driver (apt)"
"${run[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y -qq chromium chromium-driver >/dev/null
