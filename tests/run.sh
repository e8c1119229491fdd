#!/usr/bin/env bash
# Run the test suite with the real services it needs, started here and stopped by PID.
# Usage: tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
export LIGHTLY_DID_VERSION_CHECK=True HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest "$@"
