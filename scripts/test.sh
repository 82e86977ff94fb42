#!/usr/bin/env bash
# Set up this machine (scripts/setup.sh), then run the test suite from .venv.
#
# Usage: sudo bash scripts/test.sh [pytest args...]
#   e.g. sudo bash scripts/test.sh tests/test_doctor.py -k json
# With no arguments every test under tests/ runs; the exit code is pytest's (5 when no
# test ran, so an empty selection fails too).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

# Arguments that are only options (-k, -x) still get tests/ from pyproject's testpaths.
(($#)) || set -- tests
exec .venv/bin/python -m pytest -v -p no:cacheprovider "$@"
