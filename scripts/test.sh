#!/usr/bin/env bash
# Installs smartroute with its test extras and the tools the tests drive, then runs the whole
# suite: ruff, mypy --strict, and pytest with branch coverage.
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
