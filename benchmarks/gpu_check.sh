#!/usr/bin/env bash
# The GPU check on the lent GPU machine (no network there): installs the carried wheels
# (.whl/, listed in benchmarks/gpu_wheels.txt) into /tmp/site, checks the imports, then runs
# benchmarks/gpu_check.py (training runs: staged, plain, ceiling, workflow) and a loader-only
# probe of the crop loader over worker counts. Everything printed also goes to $OUT (the device
# tool's folder, when set) as it happens, so a run cut short still returns what it finished.
#
#   run(command="benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570)    # ~7-8 min
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 LIGHTLY_DID_VERSION_CHECK=True PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
DEST="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$DEST"
exec > >(tee -a "$DEST/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The CPUs this job may really use (affinity, cgroup quota): they decide how many loader
# workers help. The first H100 run saw loader throughput fall with more workers.
python3 -c "import json; from geofm import loading; print('cpus:', json.dumps(loading.cpu_report()))"
cat /sys/fs/cgroup/cpu.max 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || true
df -h /dev/shm /tmp | tail -2
python3 -m pip show timm pandas xarray typing-extensions 2>/dev/null | grep -E '^(Name|Version)' | paste - - || true
python3 -c "import terratorch, geofm.training, geofm.loading; print('imports ok')"
# Training runs (each its own process): samples/s, GPU busy %, data wait per step.
timeout -k 10 360 python3 benchmarks/gpu_check.py --out /tmp/gpu_check --order staged,plain,ceiling,workflow "$@" || echo "gpu_check.py: exit $?"
cp /tmp/gpu_check/summary.json /tmp/gpu_check/config.yaml "$DEST"/ 2>/dev/null || true
for m in staged plain ceiling workflow; do cp "/tmp/gpu_check/$m.json" "$DEST"/ 2>/dev/null || true; done
# Loader alone on this host: before (baseline) and after (tuned, staged) over worker counts,
# with the CPU each sample costs in the workers and in the main process.
timeout -k 10 100 python3 benchmarks/dataloader.py --tasks crop --modes baseline,tuned,staged --workers 0,1,2,8,15 \
  --repeats 1 --seconds 2 --min-batches 6 --batch-size 16 --no-training || echo "dataloader.py: exit $?"
