#!/usr/bin/env bash
# Installs smartroute with its test extras and the tools the tests drive, then runs the whole
# suite: ruff, mypy --strict, pytest with branch coverage on asyncio's event loop, and pytest
# once more on uvloop (SMARTROUTE_TEST_LOOP=uvloop; uvloop comes with the test extra).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-tools.sh
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

echo "== ruff"
python3 -m ruff check .
python3 -m ruff format --check .
echo "== mypy --strict"
python3 -m mypy --strict
echo "== pytest (branch coverage)"
python3 -m pytest --cov=smartroute --cov-branch --cov-report=term "$@"
echo "== pytest on uvloop"
SMARTROUTE_TEST_LOOP=uvloop python3 -m pytest -q -p no:cacheprovider "$@"
