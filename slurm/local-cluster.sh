#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for testing slurm/*.sbatch against a real
# Slurm (tests/test_slurm.py uses it; so can you).
#
#   bash slurm/local-cluster.sh [up]   # install (apt) + configure + start; waits for an idle node
#   bash slurm/local-cluster.sh status # daemons and sinfo; exit 0 iff the node takes jobs
#   bash slurm/local-cluster.sh down   # stop slurmd, slurmctld and munged
#
# Idempotent: `up` on a running cluster only checks it (seconds); on a fresh Debian/Ubuntu
# machine it runs `apt-get update` and installs slurm-wlm + munge (a minute or two).
# Needs root (it writes /etc/slurm, /etc/munge and starts daemons). No systemd needed: the
# daemons are started directly. Everything talks over 127.0.0.1 only; jobs run as the
# submitting user (root here).
#
# What it sets up (a deliberately minimal, container-friendly configuration):
#   - munge: /etc/munge/munge.key (created if missing), munged running as user munge;
#   - /etc/slurm/slurm.conf: this host (`hostname -s`, NodeAddr 127.0.0.1) with CPUs=$(nproc)
#     and RealMemory = 90% of MemTotal, one default partition `local`, select/cons_tres with
#     CR_CPU (jobs share the node by CPU, so array tasks run side by side),
#     proctrack/linuxproc and task/none (no cgroups), no accounting, SlurmUser=root;
#   - slurmctld and slurmd as daemons (state in /var/spool/slurmctld, /var/spool/slurmd;
#     logs in /var/log/slurm; pid files in /run/slurm).
# An /etc/slurm/slurm.conf that this script did not write is never overwritten (a real
# cluster's!) unless LOCAL_CLUSTER_FORCE=1.
#
# Exit codes: 0 ok; 1 the cluster did not come up (logs are printed); 2 not root (and no
# cluster already up); 3 the packages are missing and cannot be installed; 4 an
# /etc/slurm/slurm.conf this script did not write is in the way.
# Environment: LOCAL_CLUSTER_WAIT (seconds to wait for an idle node, default 90).
set -euo pipefail

cmd="${1:-up}"
HOST="$(hostname -s)"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# Written by dist_gradalign slurm/local-cluster.sh"
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
WAIT="${LOCAL_CLUSTER_WAIT:-90}"
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "[local-cluster] $*" >&2; }
die() { local rc="$1"; shift; echo "[local-cluster] error: $*" >&2; exit "$rc"; }

# pid from a pid file if that process is alive and is the named program, else empty.
live_pid() {  # live_pid PIDFILE NAME
  local pid
  pid="$(cat "$1" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  if kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]; then
    echo "$pid"
  fi
}

# The node's state as sinfo reports it ("idle", "mixed", "down*", ...), or empty.
node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1 || true; }

# Usable: slurmctld reports the node up, and (on this node) slurmd answers.
node_usable() {
  case "$(node_state)" in
    idle|mixed|allocated|completing) slurmd_answers ;;
    *) return 1 ;;
  esac
}

slurmd_answers() { scontrol show slurmd >/dev/null 2>&1; }

munge_ok() { command -v munge >/dev/null && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

# ---------------------------------------------------------------------------------------
install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die 3 "slurm/munge are not installed and apt-get is not available"
  log "installing slurm-wlm and munge with apt (apt-get update first)"
  # Keep package scripts from trying to start services (there is no init system here);
  # we start the daemons ourselves below. Reuse an existing policy-rc.d if there is one.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
  fi
  local ok=1
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2 || ok=0
  if [ "$ok" = 1 ]; then
    apt-get install -y -q --no-install-recommends slurm-wlm munge >&2 || ok=0
  fi
  if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi
  [ "$ok" = 1 ] || die 3 "apt-get could not install slurm-wlm and munge (no network or no such packages?)"
  if ! { command -v slurmctld && command -v slurmd && command -v munged; } >/dev/null; then
    die 3 "slurm-wlm/munge installed but slurmctld/slurmd/munged are not on PATH"
  fi
}

# ---------------------------------------------------------------------------------------
start_munge() {
  if munge_ok; then return 0; fi
  local user=munge
  id munge >/dev/null 2>&1 || user=root
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  if [ ! -s "$MUNGE_KEY" ]; then
    log "creating $MUNGE_KEY"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$MUNGE_KEY" --force
    else
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
  fi
  chown "$user:$user" /etc/munge "$MUNGE_KEY" /var/lib/munge /var/log/munge /run/munge
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0400 "$MUNGE_KEY"
  chmod 0755 /run/munge
  # A stale socket/pid from a killed munged makes it refuse to start.
  if [ -z "$(live_pid "$MUNGE_PID" munged)" ]; then
    rm -f "$MUNGE_PID" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  fi
  log "starting munged (as $user)"
  if [ "$user" = munge ]; then
    runuser -u munge -- munged 9>&-
  else
    munged --force 9>&-
  fi
  for _ in $(seq 1 50); do munge_ok && return 0; sleep 0.2; done
  die 1 "munged does not answer (see /var/log/munge/munged.log)"
}

# ---------------------------------------------------------------------------------------
write_conf() {  # prints "changed" when slurm.conf was (re)written
  local cpus mem tmp
  # (GNU nproc honours OMP_NUM_THREADS/OMP_THREAD_LIMIT, which must not shrink the node.)
  cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
  # 90% of MemTotal in MiB: slurmd drains a node whose RealMemory exceeds what it finds.
  mem="$(awk '/^MemTotal:/ {m = int($2 / 1024 * 0.9); print (m < 1 ? 1 : m)}' /proc/meminfo)"
  if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF" && [ "${LOCAL_CLUSTER_FORCE:-0}" != 1 ]; then
    die 4 "$CONF exists and was not written by this script; refusing to overwrite it (LOCAL_CLUSTER_FORCE=1 to force)"
  fi
  mkdir -p "$CONF_DIR"
  tmp="$(mktemp)"
  cat > "$tmp" <<EOF
$MARKER: a single-node test cluster.
ClusterName=localcluster
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
# No cgroups in containers: plain /proc process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Schedule pending jobs (e.g. the rest of a job array) every 2 s, not every 30-60 s.
SchedulerParameters=sched_interval=2,bf_interval=2
# Trust this file over what slurmd detects (containers often see more CPUs than nproc).
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No accounting.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=60
SlurmdTimeout=120
InactiveLimit=0
# Finished jobs are forgotten after >= 4 s (no accounting here). sbatch --wait polls every
# 2 s only while 2 < MinJobAge/2 does not hold; with the default 300 it backs off to 32 s.
MinJobAge=4
KillWait=30
Waittime=0
# The topology is spelled out: with CPUs= alone, Slurm assumes 1 socket x 1 core and uses 1 CPU.
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
  else
    log "writing $CONF (CPUs=$cpus RealMemory=${mem}M)"
    install -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    echo changed
  fi
}

stop_pid() {  # stop_pid PIDFILE NAME
  local pid
  pid="$(live_pid "$1" "$2")"
  [ -n "$pid" ] || return 0
  log "stopping $2 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
    sleep 0.2
  done
  log "$2 (pid $pid) ignores SIGTERM; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$1"
}

show_logs() {
  local f
  for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
    [ -e "$f" ] && { echo "----- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
  return 0
}

up() {
  if [ "$(id -u)" != 0 ]; then
    node_usable && { log "not root, but the cluster is already up"; return 0; }
    die 2 "must run as root to install and start Slurm (sudo bash $0 up)"
  fi
  install_packages
  start_munge
  local changed
  changed="$(write_conf)"
  mkdir -p "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
  chmod 0755 "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
  if [ -n "$changed" ]; then  # a new configuration: restart whatever runs
    stop_pid "$RUN_DIR/slurmd.pid" slurmd
    stop_pid "$RUN_DIR/slurmctld.pid" slurmctld
  fi
  if [ -z "$(live_pid "$RUN_DIR/slurmctld.pid" slurmctld)" ]; then
    log "starting slurmctld"
    slurmctld 9>&- || { show_logs; die 1 "slurmctld failed to start"; }
  fi
  if [ -z "$(live_pid "$RUN_DIR/slurmd.pid" slurmd)" ]; then
    log "starting slurmd"
    slurmd -N "$HOST" 9>&- || { show_logs; die 1 "slurmd failed to start"; }
  fi
  local start=$SECONDS state resumed=0
  while :; do
    state="$(node_state)"
    case "$state" in
      idle|mixed|allocated|completing)
        if slurmd_answers; then
          log "up: node $HOST is $state ($(sinfo -h -o '%P %D %c' | head -1 | awk '{print "partition " $1 ", " $3 " CPUs"}'))"
          return 0
        fi ;;
      down*|drain*|fail*)
        # e.g. left down by an earlier `down`; ReturnToService=2 usually handles it.
        if [ "$resumed" = 0 ] && [ $((SECONDS - start)) -ge 5 ]; then
          log "node is $state; resuming it"
          scontrol update NodeName="$HOST" State=RESUME >&2 || true
          resumed=1
        fi ;;
    esac
    if [ $((SECONDS - start)) -ge "$WAIT" ]; then
      sinfo -N -l >&2 || true
      scontrol show node "$HOST" >&2 || true
      show_logs
      die 1 "node $HOST is not idle after ${WAIT}s (state: '${state:-no answer from slurmctld}')"
    fi
    sleep 1
  done
}

down() {
  [ "$(id -u)" = 0 ] || die 2 "must run as root"
  stop_pid "$RUN_DIR/slurmd.pid" slurmd
  stop_pid "$RUN_DIR/slurmctld.pid" slurmctld
  stop_pid "$MUNGE_PID" munged
  log "down"
}

status() {
  local name pidfile pid
  for name in munged slurmctld slurmd; do
    case "$name" in munged) pidfile="$MUNGE_PID" ;; *) pidfile="$RUN_DIR/$name.pid" ;; esac
    pid="$(live_pid "$pidfile" "$name")"
    if [ -n "$pid" ]; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
  done
  if command -v sinfo >/dev/null; then sinfo 2>&1 || true; fi
  node_usable
}

# One `up`/`down` at a time (e.g. two test sessions starting together).
if [ "$cmd" = up ] || [ "$cmd" = down ]; then
  if [ "$(id -u)" = 0 ]; then
    mkdir -p /run/lock
    exec 9>/run/lock/dist-gradalign-local-cluster.lock
    flock -w 900 9 || die 1 "another local-cluster.sh holds the lock"
  fi
fi

case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 [up|down|status]" >&2; exit 64 ;;
esac
