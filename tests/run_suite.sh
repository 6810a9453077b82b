#!/usr/bin/env bash
# The suite in three pytest processes: test files before tests/test_evolve_postgres.py, tests/test_openvino.py on its
# own, then the rest. A process that ran tests/test_openvino.py and went on died later of a segmentation fault
# inside the interpreter (2026-12-07: in test_resume.py twice, in test_plots.py under gdb, in test_train.py): heap
# corruption that followed OpenVINO's runtime into the process each time (suspected, not pinned down). Extra
# arguments go to every run.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
first=() rest=()
for f in tests/test_*.py; do
    if [[ "$f" == tests/test_openvino.py ]]; then continue; fi
    if [[ "$f" < tests/test_evolve_postgres.py ]]; then first+=("$f"); else rest+=("$f"); fi
done
status=0
"$python" -m pytest "$@" "${first[@]}" || status=$?
"$python" -m pytest "$@" "${rest[@]}" || status=$?
"$python" -m pytest "$@" tests/test_openvino.py || status=$?
exit "$status"
