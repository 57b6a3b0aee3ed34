#!/usr/bin/env bash
# One command on a fresh machine: set up .venv (if needed), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
