#!/usr/bin/env bash
# Run every atheris fuzz target for N minutes each (default 1) and report executions/crashes.
#   bash scripts/fuzz.sh [MINUTES] [extra args for scripts/fuzz_run.py, e.g. --json out.json]
# Needs atheris: pip install -e '.[fuzz]'. Exit status 1 if anything crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-1}"
shift || true
PY="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
exec "$PY" scripts/fuzz_run.py --minutes "$MINUTES" "$@"
