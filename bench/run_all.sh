#!/usr/bin/env bash
# Runs both benchmarks and prints their tables: bench/tick.py, then bench/ingest.py.
# Arguments go to bench/ingest.py (e.g. --duration 60 --messages 200000 --guests 10000);
# PYTHON selects the interpreter (default: the project's .venv). Takes about 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}

model=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs (${model:-unknown}), $("$python" -V 2>&1)"
"$python" bench/tick.py
echo
"$python" bench/ingest.py "$@"
