#!/bin/sh
# Run the benchmark suite of issue 7 with the project's virtualenv (if any).
# Usage: bench/run.sh [--quick] [--reps N] [--only PART ...] [--update-docs]
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in ./venv/bin/python ./.venv/bin/python ../venv/bin/python python3; do
        if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
    done
fi
exec "$PY" -m bench "$@"
