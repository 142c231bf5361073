#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for testing slurm/*.sbatch against a real
# Slurm (tests/test_slurm.py uses it; so can you).
#
#   bash slurm/local-cluster.sh [up]   # install (apt) + configure + start; waits for an idle node
#   bash slurm/local-cluster.sh status # daemons and sinfo; exit 0 iff the node takes jobs
#   bash slurm/local-cluster.sh down   # stop slurmd, slurmctld and munged
#
# With `--nodes N` (N >= 2; or LOCAL_CLUSTER_NODES=N) the same commands manage an N-node
# cluster instead, each node a network namespace of this machine (slurm/netns-nodes.sh: node I
# is dga-node<I> at 10.77.0.<I>, interface dga0); see "Several nodes" below.
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
#
# Several nodes (`up --nodes N`): slurm/netns-nodes.sh makes the nodes dga-node1..N; one
# slurmctld runs on dga-node1 (SlurmctldHost=dga-node1(10.77.0.1)) and one slurmd per node,
# started inside its namespace with `-N dga-node<I>`. Their slurm.conf is
# /etc/netns/dga-node<I>/slurm/slurm.conf, which `netns-nodes.sh exec` (and `ip netns exec`)
# mounts over /etc/slurm on that node only, so the one-node cluster (/etc/slurm/slurm.conf,
# 127.0.0.1) is untouched and both can run at once; munged (a unix socket under /run) serves
# both. Each node has the machine's CPUs and memory (they share them). State in
# /var/spool/slurmctld-netns and /var/spool/slurmd-netns/<node>, logs
# /var/log/slurm/netns-*.log, pid files /run/slurm/netns-*.pid. Slurm commands for it run on a
# node, e.g.
#   bash slurm/netns-nodes.sh exec 1 sinfo
#   bash slurm/netns-nodes.sh exec 1 sbatch --nodes 2 slurm/train.sbatch CONFIG
# `down --nodes N` stops its daemons and deletes the namespaces (munged keeps running).
# Exit code 5: network namespaces cannot be created here. A node killed as a whole (its
# torchrun agent and ranks) ends the job: srun --kill-on-bad-exit stops the step on every node
# (tests/test_multinode.py; slurm/README.md, "Several nodes on one machine").
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

# What write_conf writes (the single-node cluster unless --nodes N >= 2 below).
CLUSTER=localcluster
DESC="a single-node test cluster"
CTLD_ADDR=127.0.0.1
CTLD_PIDFILE="$RUN_DIR/slurmctld.pid"
SLURMD_PIDFILE="$RUN_DIR/slurmd.pid"
CTLD_LOG="$LOG_DIR/slurmctld.log"
SLURMD_LOG="$LOG_DIR/slurmd.log"
SLURMD_SPOOL="$SPOOL_DIR"
NODES="${LOCAL_CLUSTER_NODES:-1}"
if [[ "$cmd" == --* ]]; then cmd=up; else shift || true; fi
while [ "$#" -gt 0 ]; do
  case "$1" in
    --nodes) NODES="${2:-}"; shift 2 || true ;;
    --nodes=*) NODES="${1#--nodes=}"; shift ;;
    *) echo "usage: $0 [up|down|status] [--nodes N]" >&2; exit 64 ;;
  esac
done
[[ "$NODES" =~ ^[0-9]+$ ]] && [ "$NODES" -ge 1 ] || { echo "[local-cluster] error: --nodes must be a positive integer, got '$NODES'" >&2; exit 64; }
if [ "$NODES" -gt 1 ]; then
  NETNS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/netns-nodes.sh"
  NET="${DGA_NETNS_NET:-10.77.0}"
  HOST=dga-node1
  CONF_DIR=/etc/netns/dga-node1/slurm
  CONF="$CONF_DIR/slurm.conf"
  STATE_DIR=/var/spool/slurmctld-netns
  SPOOL_DIR=/var/spool/slurmd-netns
  CLUSTER=dganetns
  DESC="a $NODES-node test cluster in network namespaces (slurm/netns-nodes.sh)"
  CTLD_ADDR="$NET.1"
  CTLD_PIDFILE="$RUN_DIR/netns-slurmctld.pid"
  SLURMD_PIDFILE="$RUN_DIR/netns-slurmd-%n.pid"
  CTLD_LOG="$LOG_DIR/netns-slurmctld.log"
  SLURMD_LOG="$LOG_DIR/netns-slurmd-%n.log"
  SLURMD_SPOOL="$SPOOL_DIR/%n"
fi

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
$MARKER: $DESC.
ClusterName=$CLUSTER
SlurmctldHost=$HOST($CTLD_ADDR)
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
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PIDFILE
SlurmdPidFile=$SLURMD_PIDFILE
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
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
$(node_lines "$cpus" "$mem")
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

node_lines() {  # node_lines CPUS MEM: the NodeName and PartitionName lines
  local i nodes="$HOST"
  if [ "$NODES" -le 1 ]; then
    echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$1 Sockets=1 CoresPerSocket=$1 ThreadsPerCore=1 RealMemory=$2 State=UNKNOWN"
  else
    for i in $(seq 1 "$NODES"); do
      echo "NodeName=dga-node$i NodeAddr=$NET.$i CPUs=$1 Sockets=1 CoresPerSocket=$1 ThreadsPerCore=1 RealMemory=$2 State=UNKNOWN"
    done
    nodes="dga-node[1-$NODES]"
  fi
  echo "PartitionName=local Nodes=$nodes Default=YES MaxTime=INFINITE State=UP"
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
  if [ -n "$(live_pid "$RUN_DIR/netns-slurmctld.pid" slurmctld)" ]; then
    log "munged keeps running: the --nodes cluster uses it"
  else
    stop_pid "$MUNGE_PID" munged
  fi
  log "down"
}

# ---------------------------------------------------------------------------------------
# Several nodes (--nodes N): the same, each node a network namespace (slurm/netns-nodes.sh).
on_node() { local i="$1"; shift; bash "$NETNS" exec "$i" "$@"; }  # run a command on node I
slurmd_pidfile() { echo "$RUN_DIR/netns-slurmd-dga-node$1.pid"; }

multi_show_logs() {
  local f
  for f in "$LOG_DIR"/netns-slurmctld.log "$LOG_DIR"/netns-slurmd-dga-node*.log; do
    [ -e "$f" ] && { echo "----- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
  return 0
}

# The nodes that are not up (slurmctld does not report them usable, or their slurmd does not
# answer), one per line; nothing when all are.
multi_not_ready() {
  local i state
  for i in $(seq 1 "$NODES"); do
    state="$(on_node 1 sinfo -h -N -n "dga-node$i" -o %T 2>/dev/null | head -1 || true)"
    case "$state" in
      idle|mixed|allocated|completing) on_node "$i" scontrol show slurmd >/dev/null 2>&1 || echo "dga-node$i ${state}" ;;
      *) echo "dga-node$i ${state:-unknown}" ;;
    esac
  done
}

up_multi() {
  [ "$(id -u)" = 0 ] || die 2 "must run as root (network namespaces, daemons)"
  local rc=0 i
  bash "$NETNS" up "$NODES" || rc=$?
  case "$rc" in
    0) ;;
    2|3|5) die "$rc" "slurm/netns-nodes.sh up $NODES failed (exit $rc): no network namespaces here" ;;
    *) die 1 "slurm/netns-nodes.sh up $NODES failed (exit $rc)" ;;
  esac
  install_packages
  start_munge
  mkdir -p /etc/slurm  # where `ip netns exec` mounts each node's slurm/ directory
  local changed
  changed="$(write_conf)"
  for i in $(seq 2 "$NODES"); do  # every node gets the same slurm.conf
    if ! cmp -s "$CONF" "/etc/netns/dga-node$i/slurm/slurm.conf"; then
      install -D -m 0644 "$CONF" "/etc/netns/dga-node$i/slurm/slurm.conf"
      changed=changed
    fi
  done
  mkdir -p "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
  chmod 0755 "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
  for i in $(seq 1 "$NODES"); do mkdir -p "$SPOOL_DIR/dga-node$i"; done
  if [ -n "$changed" ]; then  # a new configuration: restart whatever runs
    for i in $(seq 1 "$NODES"); do stop_pid "$(slurmd_pidfile "$i")" slurmd; done
    stop_pid "$CTLD_PIDFILE" slurmctld
  fi
  if [ -z "$(live_pid "$CTLD_PIDFILE" slurmctld)" ]; then
    log "starting slurmctld on dga-node1"
    on_node 1 slurmctld 9>&- || { multi_show_logs; die 1 "slurmctld failed to start"; }
  fi
  for i in $(seq 1 "$NODES"); do
    if [ -z "$(live_pid "$(slurmd_pidfile "$i")" slurmd)" ]; then
      log "starting slurmd on dga-node$i"
      on_node "$i" slurmd -N "dga-node$i" 9>&- || { multi_show_logs; die 1 "slurmd on dga-node$i failed to start"; }
    fi
  done
  local start=$SECONDS waiting resumed=0
  while :; do
    waiting="$(multi_not_ready)"
    if [ -z "$waiting" ]; then
      log "up: $NODES nodes dga-node[1-$NODES] at $NET.1-$NODES (slurmctld on dga-node1); Slurm commands: bash $NETNS exec 1 sinfo|sbatch|..."
      return 0
    fi
    if [ "$resumed" = 0 ] && [ $((SECONDS - start)) -ge 5 ] && grep -qE ' (down|drain|fail)' <<< "$waiting"; then
      log "resuming: $(echo $waiting)"
      for i in $(awk '/ (down|drain|fail)/ {print $1}' <<< "$waiting"); do
        on_node 1 scontrol update NodeName="$i" State=RESUME >&2 || true
      done
      resumed=1
    fi
    if [ $((SECONDS - start)) -ge "$WAIT" ]; then
      on_node 1 sinfo -N -l >&2 || true
      multi_show_logs
      die 1 "nodes not idle after ${WAIT}s: $(echo $waiting)"
    fi
    sleep 1
  done
}

down_multi() {
  [ "$(id -u)" = 0 ] || die 2 "must run as root"
  local pidfile
  for pidfile in "$RUN_DIR"/netns-slurmd-*.pid; do [ -e "$pidfile" ] && stop_pid "$pidfile" slurmd; done
  stop_pid "$CTLD_PIDFILE" slurmctld
  [ ! -e "$NETNS" ] || bash "$NETNS" down
  log "down (munged keeps running)"
}

status_multi() {
  local i
  say() { local pid; pid="$(live_pid "$2" "$3")"; echo "$1: $([ -n "$pid" ] && echo "running (pid $pid)" || echo stopped)"; }
  say munged "$MUNGE_PID" munged
  say "slurmctld (dga-node1)" "$CTLD_PIDFILE" slurmctld
  for i in $(seq 1 "$NODES"); do say "slurmd (dga-node$i)" "$(slurmd_pidfile "$i")" slurmd; done
  bash "$NETNS" status >/dev/null 2>&1 || { echo "no network namespaces (slurm/netns-nodes.sh status)"; return 1; }
  on_node 1 sinfo 2>&1 || true
  [ -z "$(multi_not_ready)" ]
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

if [ "$NODES" -gt 1 ]; then
  case "$cmd" in
    up) up_multi ;;
    down) down_multi ;;
    status) status_multi ;;
    *) echo "usage: $0 [up|down|status] [--nodes N]" >&2; exit 64 ;;
  esac
  exit 0
fi
case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 [up|down|status] [--nodes N]" >&2; exit 64 ;;
esac
