#!/usr/bin/env bash
# The test suite: installs what it needs into .venv, then runs pytest (arguments pass through).
#   scripts/test.sh                      everything, as CI runs it
#   scripts/test.sh -m "not slow"        the quick unit tests only
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
