#!/usr/bin/env bash
# One command on a fresh machine: set up .venv, then run the quickstart demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/quickstart.py "$@"
