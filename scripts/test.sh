#!/usr/bin/env bash
# The test command: sets the machine up if needed, then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::DeprecationWarning}
exec .venv/bin/python -m pytest tests "$@"
