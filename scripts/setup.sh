#!/usr/bin/env bash
# Create .venv and install LogIX with its test and integration extras.
# torch==2.13.0 goes first: a CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# Headless Chromium for the dashboard's browser tests (tests/test_dashboard_browser.py); they
# skip, naming the package, where it cannot be installed (not root).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    if ! (apt-get update -q && DEBIAN_FRONTEND=noninteractive \
          apt-get install -y -q chromium chromium-driver); then
      echo "setup: apt-get could not install chromium / chromium-driver; the browser tests" \
           "skip, everything else works" >&2
    fi
  else
    echo "setup: chromium / chromium-driver missing (not root: not installed); browser tests skip" >&2
  fi
fi
