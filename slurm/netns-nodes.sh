#!/usr/bin/env bash
# Several "hosts" on this machine, as Linux network namespaces, for testing multi-node runs
# (torchrun --nnodes N, sbatch --nodes N) without a second machine. tests/test_multinode.py
# and `slurm/local-cluster.sh up --nodes N` use it; so can you (as root).
#
#   bash slurm/netns-nodes.sh up [N]        # N nodes (default 2); idempotent
#   bash slurm/netns-nodes.sh exec I CMD... # run CMD on node I (1-based), as that host
#   bash slurm/netns-nodes.sh pids I        # the processes on node I, one pid a line
#   bash slurm/netns-nodes.sh status        # the nodes, their addresses; exit 0 iff up
#   bash slurm/netns-nodes.sh down          # kill what runs on the nodes, delete everything
#
# What `up N` makes (nothing is added to this machine's own network namespace):
#   - node I = network namespace dga-node<I> with loopback up and one interface `dga0`
#     (the same name on every node, so GLOO_SOCKET_IFNAME=dga0 fits all) at 10.77.0.<I>/24;
#   - the nodes' dga0 are veth pairs into a bridge `dga-br` in a switch namespace dga-net
#     (no address there: it only forwards between the nodes). No default route anywhere:
#     traffic stays on 10.77.0.0/24 and each node's loopback;
#   - /etc/netns/dga-node<I>/hosts, mounted over /etc/hosts on that node: localhost plus
#     dga-node1..N -> 10.77.0.1..N (slurm/local-cluster.sh adds /etc/netns/dga-node<I>/slurm).
# `exec I CMD` runs CMD in node I's network namespace, in a mount namespace where every
# /etc/netns/dga-node<I>/X is bound over /etc/X (as `ip netns exec` does, but keeping this
# machine's /sys, cgroups included) and a UTS namespace whose hostname is dga-node<I>.
# Each node thus has its own name, address and /etc/hosts, like a
# real host: torchrun's c10d rendezvous recognises 10.77.0.1 as its own address on node 1,
# and the rank-0 node's name (what torchrun hands the other nodes as MASTER_ADDR) resolves to
# it on every node. Files, users and /run (munge's socket) are shared with this machine.
#
# `up` on nodes that are already up only checks them. `down` sends SIGTERM, then SIGKILL, to
# every process left in the namespaces (they were started there through `exec`), deletes the
# namespaces (which removes their links) and /etc/netns/dga-node*; it also clears what a
# crashed earlier run left behind.
#
# Exit codes: 0 ok; 1 failed; 2 not root; 3 `ip` (iproute2) missing and apt cannot install it;
# 5 this machine cannot create network namespaces (e.g. an unprivileged container).
# Environment: DGA_NETNS_NET, the /24 to use (default 10.77.0; node I gets .I).
set -euo pipefail

cmd="${1:-status}"
PREFIX=dga-node
SWITCH=dga-net
BRIDGE=dga-br
IFACE=dga0
NET="${DGA_NETNS_NET:-10.77.0}"
ETC_NETNS=/etc/netns
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "[netns-nodes] $*" >&2; }
die() { local rc="$1"; shift; echo "[netns-nodes] error: $*" >&2; exit "$rc"; }

ensure_ip() {
  command -v ip >/dev/null && return 0
  command -v apt-get >/dev/null || die 3 "ip (iproute2) is not installed and apt-get is not available"
  log "installing iproute2 with apt (apt-get update first)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q --no-install-recommends iproute2; } >&2 \
    || die 3 "apt-get could not install iproute2"
  command -v ip >/dev/null || die 3 "iproute2 installed but ip is not on PATH"
}

ensure_tools() {
  ensure_ip
  command -v unshare >/dev/null && command -v nsenter >/dev/null \
    || die 3 "unshare and nsenter (util-linux) are needed and not installed"
}

ns_exists() { [[ $'\n'"$(ip netns list 2>/dev/null | awk '{print $1}')"$'\n' == *$'\n'"$1"$'\n'* ]]; }

# Our namespaces, node ones first (so their processes die before the switch goes).
our_namespaces() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+$" | sort -V || true
  ns_exists "$SWITCH" && echo "$SWITCH"
  return 0
}

node_ok() {  # node_ok I: the namespace exists, dga0 is up with its address, loopback is up
  local ns="$PREFIX$1" addr link lo
  ns_exists "$ns" || return 1
  # (captured, not piped into grep -q: with pipefail an early-exiting grep fails the pipe)
  addr="$(ip -n "$ns" -o addr show dev "$IFACE" 2>/dev/null || true)"
  link="$(ip -n "$ns" -o link show dev "$IFACE" 2>/dev/null || true)"
  lo="$(ip -n "$ns" -o link show dev lo 2>/dev/null || true)"
  [[ "$addr" == *" $NET.$1/24 "* && "$link" == *"state UP"* && "$lo" == *"<LOOPBACK,UP"* ]] || return 1
  [ -f "$ETC_NETNS/$ns/hosts" ]
}

kill_ns_procs() {  # SIGTERM, then SIGKILL after 5 s, to every process in namespace $1
  local ns="$1" pids _
  pids="$(ip netns pids "$ns" 2>/dev/null || true)"
  [ -n "$pids" ] || return 0
  log "stopping $(echo "$pids" | wc -w) process(es) on $ns"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 25); do
    [ -z "$(ip netns pids "$ns" 2>/dev/null || true)" ] && return 0
    sleep 0.2
  done
  pids="$(ip netns pids "$ns" 2>/dev/null || true)"
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  sleep 0.2
}

down() {
  [ "$(id -u)" = 0 ] || die 2 "must run as root"
  command -v ip >/dev/null || return 0
  local ns
  for ns in $(our_namespaces); do kill_ns_procs "$ns"; done
  for ns in $(our_namespaces); do ip netns del "$ns" 2>/dev/null || log "could not delete namespace $ns"; done
  rm -rf "$ETC_NETNS"/"$PREFIX"[0-9]*
  rmdir "$ETC_NETNS" 2>/dev/null || true  # only if nothing else is there
  log "down"
}

up() {
  local n="${1:-2}" i ok=1
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 250 ] || die 1 "node count must be 1..250, got '$n'"
  [ "$(id -u)" = 0 ] || die 2 "must run as root to create network namespaces"
  ensure_tools
  for i in $(seq 1 "$n"); do node_ok "$i" || ok=0; done
  if [ "$ok" = 1 ] && ns_exists "$SWITCH" && ! ns_exists "$PREFIX$((n + 1))"; then
    log "up: $n node(s) already there"
    return 0
  fi
  down 2>/dev/null || true  # a partial or differently sized set: start over
  ip netns add "$SWITCH" 2>/dev/null || { ip netns del "$SWITCH" 2>/dev/null || true; die 5 "cannot create a network namespace here (ip netns add failed)"; }
  ip -n "$SWITCH" link add "$BRIDGE" type bridge || die 5 "cannot create a bridge in a network namespace"
  ip -n "$SWITCH" link set "$BRIDGE" up
  ip -n "$SWITCH" link set lo up
  local hosts
  hosts="127.0.0.1 localhost"$'\n'"::1 localhost ip6-localhost ip6-loopback"
  for i in $(seq 1 "$n"); do hosts+=$'\n'"$NET.$i $PREFIX$i"; done
  for i in $(seq 1 "$n"); do
    local ns="$PREFIX$i"
    ip netns add "$ns" || die 5 "ip netns add $ns failed"
    ip -n "$SWITCH" link add "p$i" type veth peer name "$IFACE" netns "$ns" || die 5 "cannot create a veth pair"
    ip -n "$SWITCH" link set "p$i" master "$BRIDGE"
    ip -n "$SWITCH" link set "p$i" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$NET.$i/24" dev "$IFACE"
    ip -n "$ns" link set "$IFACE" up
    mkdir -p "$ETC_NETNS/$ns"
    printf '%s\n' "$hosts" > "$ETC_NETNS/$ns/hosts"
  done
  # The veths come up asynchronously; wait until every node reaches every other.
  local start=$SECONDS j
  for i in $(seq 1 "$n"); do
    for j in $(seq 1 "$n"); do
      [ "$i" = "$j" ] && continue
      until ip netns exec "$PREFIX$i" ping -c 1 -W 1 "$NET.$j" >/dev/null 2>&1 \
            || node_reaches "$i" "$j"; do
        [ $((SECONDS - start)) -lt 20 ] || die 1 "$PREFIX$i cannot reach $NET.$j after 20 s"
        sleep 0.2
      done
    done
  done
  ( node_exec 1 true ) >/dev/null 2>&1 \
    || die 5 "cannot enter the node namespaces (unshare --mount --uts / nsenter --net failed)"
  log "up: $n node(s) ${PREFIX}1..$n at $NET.1..$n on $IFACE"
}

# Reachability without ping (not always installed): a TCP connect to a closed port is
# refused (reachable) rather than timing out or failing with 'no route'.
node_reaches() {
  local out
  out="$(ip netns exec "$PREFIX$1" timeout 2 bash -c "exec 3<>/dev/tcp/$NET.$2/9" 2>&1 || true)"
  [[ "$out" == *refused* ]]
}

node_exec() {
  local i="${1:-}"
  [[ "$i" =~ ^[0-9]+$ ]] || die 1 "usage: $0 exec NODE CMD [ARGS...]"
  shift
  [ "$#" -ge 1 ] || die 1 "usage: $0 exec NODE CMD [ARGS...]"
  ns_exists "$PREFIX$i" || die 1 "no node $i (bash $0 up first)"
  # Like `ip netns exec`, but /sys stays this machine's (ip netns exec mounts a fresh sysfs,
  # which hides /sys/fs/cgroup, and slurmd will not start without it): a private mount and
  # UTS namespace, the hostname, /etc/netns/<node>/* bound over /etc/*, then the node's network.
  exec unshare --mount --propagation slave --uts -- sh -c '
    ns="$1"; shift
    echo "$ns" > /proc/sys/kernel/hostname || exit 1
    for f in /etc/netns/"$ns"/*; do
      [ -e "$f" ] && { mount --bind "$f" "/etc/${f##*/}" || exit 1; }
    done
    exec nsenter --net=/run/netns/"$ns" -- "$@"' sh "$PREFIX$i" "$@"
}

status() {
  local ns n=0
  for ns in $(our_namespaces); do
    [ "$ns" = "$SWITCH" ] && continue
    n=$((n + 1))
    echo "$ns: $(ip -n "$ns" -o -4 addr show dev "$IFACE" 2>/dev/null | awk '{print $4}' | head -1)" \
         "($(ip netns pids "$ns" 2>/dev/null | wc -l) process(es))"
  done
  [ "$n" -gt 0 ] && ns_exists "$SWITCH"
}

case "$cmd" in
  up) up "${2:-2}" ;;
  down) down ;;
  status) status ;;
  exec) shift; node_exec "$@" ;;
  pids) ns_exists "$PREFIX${2:-}" || die 1 "no node '${2:-}'"; ip netns pids "$PREFIX$2" ;;
  *) echo "usage: $0 up [N] | exec I CMD... | pids I | status | down" >&2; exit 64 ;;
esac
