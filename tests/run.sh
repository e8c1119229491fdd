#!/usr/bin/env bash
# Run the test suite with the real services it needs, started here and stopped by PID.
# Usage: tests/run.sh [pytest args...]   (as root on Debian: it installs system packages)
set -euo pipefail
cd "$(dirname "$0")/.."
export LIGHTLY_DID_VERSION_CHECK=True HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

tests/setup-system.sh
# The one-node SLURM cluster (with accounting) for the cluster tests; stopped on exit.
tests/cluster/slurm-up.sh
trap 'tests/cluster/slurm-down.sh' EXIT

.venv/bin/python -m pytest "$@"
