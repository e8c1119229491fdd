#!/usr/bin/env bash
# System tools the tests need beyond .venv, installed only when missing (idempotent):
# Debian packages (SLURM is installed by tests/cluster/slurm-up.sh itself; postgresql's own
# service is not used: the test starts a throwaway cluster), and npm tools
# into .tools/ (never global).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null || need+=(chromium)
command -v dot >/dev/null || need+=(graphviz)
command -v git >/dev/null || need+=(git)
# PostgreSQL for the search's RDB-storage test (tests/postgres.py starts its own cluster).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/geofm-apt.log 2>&1 ||
    { apt-get update -q >>/tmp/geofm-apt.log 2>&1 && apt-get install -y -q --no-install-recommends "${need[@]}" >>/tmp/geofm-apt.log 2>&1; } ||
    { tail -20 /tmp/geofm-apt.log; echo "setup-system: could not install ${need[*]}" >&2; exit 1; }
fi

# gitlab-ci-local 4.74+ needs Node 22; 4.73.0 runs on Node 20.
if [ ! -x .tools/node_modules/.bin/gitlab-ci-local ]; then
  npm install --silent --no-audit --no-fund --prefix .tools gitlab-ci-local@4.73.0 >/tmp/geofm-npm.log 2>&1 ||
    { tail -20 /tmp/geofm-npm.log; echo "setup-system: npm install gitlab-ci-local failed" >&2; exit 1; }
fi
