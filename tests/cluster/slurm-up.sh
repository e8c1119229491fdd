#!/usr/bin/env bash
# Bring up a one-node SLURM cluster with accounting (MariaDB + slurmdbd) on
# localhost, for tests. Idempotent: daemons whose recorded PID is alive are
# left alone. Needs root and Debian/Ubuntu (apt). Stop with slurm-down.sh.
#
# Env: GEOFM_SLURM_STATE (state folder, default /tmp/geofm-slurm),
#      GEOFM_SLURM_DBPORT (MariaDB TCP port on 127.0.0.1, default 13306).
set -euo pipefail

STATE=${GEOFM_SLURM_STATE:-/tmp/geofm-slurm}
DBPORT=${GEOFM_SLURM_DBPORT:-13306}
CLUSTER=geofm ACCOUNT=geofm
PKGS="slurm-wlm slurm-client slurmdbd munge mariadb-server"
T0=$EPOCHREALTIME
unset SLURM_CONF   # our clients must read the config this script writes

die() { echo "slurm-up: $*" >&2; exit 1; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
[ "$(id -u)" = 0 ] || die "must run as root"
mkdir -p "$STATE"/{etc,log,run,pids,spool/ctld,spool/d}
touch "$STATE/.geofm-slurm"   # marker: lets slurm-down.sh --purge know this folder is ours

# --- packages ---------------------------------------------------------------
missing=$(for p in $PKGS; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || echo "$p"; done)
if [ -n "$missing" ]; then
  t=$EPOCHREALTIME
  # Keep the packages' init scripts from starting system daemons (a system
  # munged would hold /run/munge); only if no policy is in place already.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; own_policy=1
  fi
  inst() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing; }
  ok=1
  inst >"$STATE/log/apt.log" 2>&1 || { apt-get update -q && inst; } >>"$STATE/log/apt.log" 2>&1 || ok=0
  [ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ $ok = 1 ] || { tail -n 20 "$STATE/log/apt.log" >&2; die "apt-get install failed:" $missing; }
  echo "slurm-up: installed" $missing "in $(since "$t")s"
fi

# --- helpers ----------------------------------------------------------------
# alive NAME: the PID we recorded for NAME runs, is not a zombie, and is NAME
# (guards against PID reuse after a reboot or a crash).
alive() {
  local f=$STATE/pids/$1.pid pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]
}
# start NAME CMD...: run CMD detached (own session, so a Ctrl-C or a `timeout`
# around the caller does not kill it); the wrapper writes its own PID and then
# execs CMD, so the recorded PID is the daemon's. stdout/stderr go to
# log/NAME.out (early crashes); the daemons' own logs are log/NAME.log.
start() {
  local name=$1; shift
  if alive "$name"; then echo "slurm-up: $name already running (pid $(cat "$STATE/pids/$name.pid"))"; return; fi
  rm -f "$STATE/pids/$name.pid"
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$STATE/pids/$name.pid" "$@" \
    >>"$STATE/log/$name.out" 2>&1 </dev/null &
  for _ in $(seq 50); do [ -s "$STATE/pids/$name.pid" ] && return; sleep 0.1; done
  die "$name did not start"
}
# wait_for NAME SECONDS CMD...: poll CMD until it succeeds; fail fast, with the
# tail of the daemon's log, if the daemon died or time ran out.
wait_for() {
  local name=$1 secs=$2 i; shift 2
  for ((i = 0; i < secs * 5; i++)); do
    "$@" >/dev/null 2>&1 && return
    [ -s "$STATE/pids/$name.pid" ] && ! alive "$name" && break
    sleep 0.2
  done
  echo "slurm-up: $name not ready (waited for: $*); tail of its logs:" >&2
  tail -n 15 "$STATE/log/$name".{out,log} >&2 2>/dev/null || true
  exit 1
}
# put SRC DST: install a generated file; say so if it changed under a running daemon.
put() {
  if ! cmp -s "$1" "$2"; then
    [ -e "$2" ] && alive slurmctld && echo "slurm-up: $2 changed; run slurm-down.sh then slurm-up.sh to apply" >&2
    mv "$1" "$2"
  else rm -f "$1"; fi
}

# --- munge (default key and socket: jobs and clients look there) -------------
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key; }
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 "$STATE/munge"
if ! alive munged && munge -n >/dev/null 2>&1; then
  echo "slurm-up: using a munged that slurm-up.sh did not start"   # e.g. a system one
else
  # munged refuses to run as root with a munge-owned key, so run it as munge.
  start munged setpriv --reuid=munge --regid=munge --init-groups munged -F \
    --pid-file="$STATE/munge/munged.pid" --seed-file="$STATE/munge/munged.seed"
  wait_for munged 10 munge -n
fi

# --- MariaDB (datadir and socket under $STATE; TCP on 127.0.0.1 for slurmdbd,
# because Debian's /etc/mysql/my.cnf pins the client socket to /run/mysqld) ---
if [ ! -d "$STATE/mysql/mysql" ]; then
  mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root \
    --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 ||
    { tail -n 20 "$STATE/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
fi
start mariadbd mariadbd --no-defaults --user=root --datadir="$STATE/mysql" \
  --socket="$STATE/run/mysqld.sock" --pid-file="$STATE/run/mariadbd.pid" \
  --log-error="$STATE/log/mariadbd.log" --bind-address=127.0.0.1 --port="$DBPORT" \
  --skip-name-resolve --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900
sql() { mariadb --no-defaults --socket="$STATE/run/mysqld.sock" -uroot -e "$1"; }
wait_for mariadbd 30 sql 'SELECT 1'
[ -s "$STATE/etc/dbpass" ] || (umask 077; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/etc/dbpass")
DBPASS=$(cat "$STATE/etc/dbpass")
sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# --- SLURM config -------------------------------------------------------------
# The node line comes from the hardware; RealMemory ~5% under what slurmd
# reports, else slurmd registers with less than configured and the node drains.
node=$(slurmd -C | head -n 1 | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^RealMemory=/) {
  split($i, a, "="); $i = "RealMemory=" int(a[2] * 0.95) }; print }')
cat >"$STATE/etc/slurm.conf.new" <<EOF
# Generated by tests/cluster/slurm-up.sh; one-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups here (no systemd): track processes by parent PID, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job with no --mem takes the whole node's memory.
DefMemPerCPU=1024
# Sample RSS every second; OverMemoryKill kills a step above its --mem (the
# job then ends FAILED, not OUT_OF_MEMORY as with cgroups).
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# Reject unknown accounts at submit time, as real sites do.
AccountingStorageEnforce=associations,limits
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue/scontrol for 5 minutes.
MinJobAge=300
# A node that comes back with a valid config returns to service by itself.
ReturnToService=2
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
(umask 077; cat >"$STATE/etc/slurmdbd.conf.new" <<EOF
# Generated by tests/cluster/slurm-up.sh.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
)
put "$STATE/etc/slurm.conf.new" "$STATE/etc/slurm.conf"
put "$STATE/etc/slurmdbd.conf.new" "$STATE/etc/slurmdbd.conf"
chmod 600 "$STATE/etc/slurmdbd.conf"
# Jobs started by the Snakemake SLURM plugin lose SLURM_CONF, so the config
# must be at the compiled-in path; slurmdbd.conf is looked up beside it.
mkdir -p /etc/slurm
for f in slurm.conf slurmdbd.conf; do
  [ -e "/etc/slurm/$f" ] && [ ! -L "/etc/slurm/$f" ] && die "/etc/slurm/$f is a real file; move it away first"
  ln -sfn "$STATE/etc/$f" "/etc/slurm/$f"
done

# --- slurmdbd, accounting records, slurmctld, slurmd ---------------------------
start slurmdbd slurmdbd -D
wait_for slurmdbd 30 sacctmgr -n list cluster
# The cluster must exist in the database before slurmctld registers.
# (Beware: `sacctmgr list user X account=Y` asks y/N and, on EOF, prints
# "Y or N please" forever; list associations instead.)
has() { [ -n "$(timeout 20 sacctmgr -n -P list "$@" </dev/null 2>/dev/null | head -n 1)" ]; }
has cluster "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
has account "$ACCOUNT" || sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="geofm tests" >/dev/null
has assoc cluster="$CLUSTER" account="$ACCOUNT" user=root ||
  sacctmgr -i add user root Account="$ACCOUNT" DefaultAccount="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
start slurmctld slurmctld -D
wait_for slurmctld 30 timeout 5 scontrol ping
start slurmd slurmd -D
# Up means the node takes jobs (idle, or busy with jobs if we ran before).
node_ok() { sinfo -h -N -o %t | grep -Eqx 'idle|mix|alloc|comp'; }
wait_for slurmd 30 node_ok
wait_for slurmdbd 15 sacct -n -X -S now-1minutes
echo "slurm-up: cluster $CLUSTER up in $(since "$T0")s: $(sinfo -h -N -o '%N %t %c CPUs %m MB') (state: $STATE)"
