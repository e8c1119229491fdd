#!/usr/bin/env bash
# Stop the test cluster started by slurm-up.sh: only the PIDs it recorded
# (TERM, then KILL after a grace period), never processes found by name.
# --purge also deletes the state folder and the /etc/slurm links into it.
set -euo pipefail
unset SLURM_CONF   # talk to the cluster slurm-up.sh configured

STATE=${GEOFM_SLURM_STATE:-/tmp/geofm-slurm}
GRACE=${GEOFM_SLURM_GRACE:-10}   # seconds between TERM and KILL
purge=0
case "${1:-}" in --purge) purge=1 ;; "") ;; *) echo "usage: $0 [--purge]" >&2; exit 2 ;; esac

# Same check as slurm-up.sh: recorded PID alive, not a zombie, and the right program.
alive() {
  local f=$STATE/pids/$1.pid pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]
}
stop() {
  local name=$1 pid i
  if alive "$name"; then
    pid=$(cat "$STATE/pids/$name.pid")
    kill -TERM "$pid"
    for ((i = 0; i < GRACE * 5; i++)); do alive "$name" || break; sleep 0.2; done
    if alive "$name"; then echo "slurm-down: $name ($pid) ignored TERM, sending KILL"; kill -KILL "$pid"; fi
    echo "slurm-down: stopped $name ($pid)"
  fi
  rm -f "$STATE/pids/$name.pid"
}

# slurmd leaves running job steps (slurmstepd) behind when it stops, so cancel
# this cluster's jobs first and give them a moment to finish (bounded).
if alive slurmctld && alive slurmd; then
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    echo "slurm-down: cancelling jobs" $jobs
    scancel $jobs || true
    for ((i = 0; i < 75; i++)); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
# Reverse start order: clients of a daemon stop before the daemon.
for name in slurmd slurmctld slurmdbd mariadbd munged; do stop "$name"; done

if [ $purge = 1 ]; then
  for f in slurm.conf slurmdbd.conf; do
    [ "$(readlink "/etc/slurm/$f" 2>/dev/null)" = "$STATE/etc/$f" ] && rm -f "/etc/slurm/$f"
  done
  # Only delete a folder slurm-up.sh made (it leaves a marker file).
  if [ -e "$STATE/.geofm-slurm" ]; then rm -rf "$STATE"; echo "slurm-down: removed $STATE"
  else echo "slurm-down: $STATE has no .geofm-slurm marker; not removing it" >&2; fi
fi
