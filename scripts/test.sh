#!/usr/bin/env bash
# One command on a fresh machine: set up .venv (if needed), then run the test suite.
#   bash scripts/test.sh           every test (what CI runs)
#   bash scripts/test.sh --fast    all but the tests marked slow: the edit-test loop
# Other arguments go to pytest (e.g. tests/test_index.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not slow" "$@"
fi
.venv/bin/python -m pytest -q "$@"
