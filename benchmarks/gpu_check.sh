#!/usr/bin/env bash
# The GPU check on the lent GPU machine (no network there): installs the carried wheels
# (.whl/, listed in benchmarks/gpu_wheels.txt) into /tmp/site, checks the imports, then runs
# benchmarks/gpu_check.py. Results: /tmp/gpu_check (copied to $OUT, the device tool's folder, when set).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 LIGHTLY_DID_VERSION_CHECK=True PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The CPUs this container may really use: a 16-core probe saw loader workers bring no gain,
# so record the affinity and any cgroup CPU quota next to the figures.
python3 -c "import os; print('cpus: nproc', os.cpu_count(), 'affinity', len(os.sched_getaffinity(0)))"
cat /sys/fs/cgroup/cpu.max 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || true
df -h /dev/shm | tail -1
python3 -m pip show timm pandas xarray typing-extensions 2>/dev/null | grep -E '^(Name|Version)' | paste - - || true
python3 -c "import terratorch, geofm.jobs; print('imports ok, terratorch', terratorch.__version__ if hasattr(terratorch, '__version__') else '')"
python3 benchmarks/gpu_check.py --out /tmp/gpu_check "$@"
if [ -n "${OUT:-}" ]; then cp /tmp/gpu_check/*.json /tmp/gpu_check/config.yaml "$OUT"/; fi
