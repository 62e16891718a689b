#!/usr/bin/env bash
# Creates .venv in the project and installs Drip into it (and the test tools with --test).
# Safe to run again: it reinstalls only when requirements*.txt or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "scripts/setup.sh: Drip needs Python 3.10 or newer ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.x" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv || {
        echo "scripts/setup.sh: could not create .venv; on Debian/Ubuntu: sudo apt-get install python3-venv" >&2
        exit 1
    }
fi

extras=""
files="requirements.txt requirements-nodeps.txt pyproject.toml"
if [ "${1:-}" = "--test" ]; then
    extras="[test]"
    files="$files requirements-test.txt"
fi
stamp=".venv/.drip-installed$extras"
want=$(cat $files | sha256sum | cut -c1-16)
# An install with the test tools (scripts/test.sh) that is still current holds all Drip needs.
with_tests=$(cat requirements.txt requirements-nodeps.txt pyproject.toml requirements-test.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] && [ "$(cat ".venv/.drip-installed[test]" 2>/dev/null)" != "$with_tests" ]; then
    echo "[drip] installing Drip and its dependencies into .venv (PyTorch is large: a few minutes the first time)" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".$extras"
    # Without their dependencies: they ask for the GUI build of OpenCV (see the file).
    .venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
    echo "$want" > "$stamp"
fi
