#!/usr/bin/env bash
# Test hosts with addresses of their own: one network namespace per host,
# joined by veth pairs to a bridge that lives in a namespace of its own, so
# nothing is added to the machine's own network. Every address is inside
# 10.231.0.0/24, which exists only in these namespaces.
#
#   scripts/netlab.sh up            the hosts, then on them: RabbitMQ r1 r2 r3
#                                   (clustered), PostgreSQL primary (db) and
#                                   streaming standby (replica), Redis (redis);
#                                   g1 g2 g3 for gateways, c for clients
#   scripts/netlab.sh down          stops everything and removes the hosts
#   scripts/netlab.sh run HOST CMD  runs CMD on HOST (its namespace)
#   scripts/netlab.sh addr HOST     HOST's address
#   scripts/netlab.sh urls          the broker nodes' AMQP URLs, comma-separated
#   scripts/netlab.sh cut A B,C     A and B, A and C no longer reach each other
#   scripts/netlab.sh cut-from A B  packets from B to A are lost; A to B go
#   scripts/netlab.sh slow HOST SPEC netem on HOST's link (e.g. "delay 200ms 50ms loss 5%"),
#                                   where the kernel has netem (can-slow says)
#   scripts/netlab.sh heal          every cut and slow link mended
#   scripts/netlab.sh can-slow      succeeds when this kernel can make slow links
#   scripts/netlab.sh lag SECONDS   the standby applies commits that late (0: at once)
#   scripts/netlab.sh kill NODE     SIGKILL a broker node; start NODE starts it again
#
# A cut drops packets silently, as a failed switch port or a firewall
# would: no reset, no ICMP, no error for the sender. The sender's neighbour
# entry for the cut address is pinned to a MAC nobody has, so its frames
# go nowhere (this needs no firewall or qdisc module in the kernel). `up`
# tears down a previous lab first; `down` is safe to run any time.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${NETLAB_PREFIX:-gwlab}
NETLAB_DIR=${NETLAB_DIR:-/tmp/product-gateway-netlab}
NET=10.231.0
WAIT_SECS=${NETLAB_WAIT_SECS:-90}
HOSTS=(r1 r2 r3 db replica redis g1 g2 g3 c)
NODES=(r1 r2 r3)

log() { echo "netlab: $*" >&2; }
die() { log "$*"; exit 1; }

addr() {
    case $1 in
        r1) echo $NET.11 ;; r2) echo $NET.12 ;; r3) echo $NET.13 ;;
        db) echo $NET.21 ;; replica) echo $NET.22 ;; redis) echo $NET.23 ;;
        g1) echo $NET.31 ;; g2) echo $NET.32 ;; g3) echo $NET.33 ;;
        c) echo $NET.41 ;;
        *) die "no host $1 (${HOSTS[*]})" ;;
    esac
}

ns() { echo "$PREFIX-$1"; }
switch() { echo "$PREFIX-switch"; }
in_ns() { ip netns exec "$(ns "$1")" "${@:2}"; }

wait_until() {
    local what=$1 i
    shift
    for ((i = 0; i < WAIT_SECS; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    die "timed out after ${WAIT_SECS}s waiting for $what"
}

check_allowed() {
    [[ $(id -u) -eq 0 ]] || die "network namespaces need root; run as root"
    command -v ip >/dev/null && command -v tc >/dev/null || die "ip and tc (Debian's iproute2) are needed"
    local probe="$PREFIX-probe-$$"
    ip netns add "$probe" 2>/dev/null || die "this machine does not allow network namespaces (ip netns add failed)"
    ip netns del "$probe"
}

# Each host: eth0 at its address, its peer on the switch's bridge.
add_host() {
    local h=$1
    ip netns add "$(ns "$h")"
    ip -n "$(switch)" link add "$h" type veth peer name eth0 netns "$(ns "$h")"
    ip -n "$(switch)" link set "$h" master br0 up
    ip -n "$(ns "$h")" addr add "$(addr "$h")/24" dev eth0
    ip -n "$(ns "$h")" link set eth0 up
    ip -n "$(ns "$h")" link set lo up
}

hosts_up() {
    ip netns add "$(switch)"
    ip -n "$(switch)" link add br0 type bridge
    ip -n "$(switch)" link set br0 up
    local h
    for h in "${HOSTS[@]}"; do add_host "$h"; done
    log "hosts ${HOSTS[*]} on $NET.0/24"
}

# --- RabbitMQ -----------------------------------------------------------------

node_name() { echo "rabbit@$(addr "$1")"; }
# As the nodes run: the rabbitmq user, the node's own environment file
# (the machine's pins Erlang to 127.0.0.1), the shared cookie.
as_rabbit() { # HOST CMD...
    in_ns "$1" setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
        env HOME=/var/lib/rabbitmq USER=rabbitmq LOGNAME=rabbitmq \
        RABBITMQ_CONF_ENV_FILE="$NETLAB_DIR/$1/rabbitmq-env.conf" "${@:2}"
}
ctl() { as_rabbit "$1" /usr/lib/rabbitmq/bin/rabbitmqctl -q --longnames -n "$(node_name "$1")" "${@:2}"; }
beam_pid() { cat "$NETLAB_DIR/$1/pid" 2>/dev/null || true; }

start_node() {
    local n=$1 dir="$NETLAB_DIR/$1" want hard
    mkdir -p "$dir/mnesia" "$dir/log"
    # Quorum queues and the stream replicate by Raft; a node cut off from
    # the majority pauses instead of serving a diverging copy. The stream's
    # leader moves only once the nodes have given the lost one up
    # (net_ticktime: 60 s by default, 7.5-12.5 s with 10).
    cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 5672
management.tcp.port = 15672
loopback_users = none
max_message_size = 262144
cluster_partition_handling = pause_minority
net_ticktime = 10
EOF
    echo "[rabbitmq_management]." >"$dir/enabled_plugins"
    cat >"$dir/rabbitmq-env.conf" <<EOF
NODENAME=$(node_name "$n")
USE_LONGNAME=true
ERL_EPMD_ADDRESS=$(addr "$n"),127.0.0.1
EOF
    chown -R rabbitmq:rabbitmq "$dir"
    want=65536
    hard=$(ulimit -Hn)
    if [[ "$hard" != unlimited ]] && ((want > hard)); then want=$hard; fi
    log "starting $(node_name "$n")"
    # The node's own port mapper, on its address (and loopback, for the CLI).
    as_rabbit "$n" env ERL_EPMD_ADDRESS="$(addr "$n"),127.0.0.1" epmd -daemon
    (
        ulimit -n "$want"
        cd "$dir"
        # setpriv switches user without PAM, so the limit set here stays.
        setsid ip netns exec "$(ns "$n")" setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
            env HOME=/var/lib/rabbitmq USER=rabbitmq LOGNAME=rabbitmq \
            RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
            RABBITMQ_USE_LONGNAME=true \
            RABBITMQ_NODENAME="$(node_name "$n")" \
            ERL_EPMD_ADDRESS="$(addr "$n"),127.0.0.1" \
            RABBITMQ_MNESIA_BASE="$dir/mnesia" \
            RABBITMQ_LOG_BASE="$dir/log" \
            RABBITMQ_PID_FILE="$dir/pid" \
            RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
            RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+S 1:1 +A 4" \
            /usr/lib/rabbitmq/bin/rabbitmq-server >"$dir/log/startup.log" 2>&1 </dev/null &
    )
    wait_until "$n to boot" ctl "$n" await_startup
}

three_running() {
    local s
    s=$(ctl r1 cluster_status --formatter json) || return 1
    python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if len(d["running_nodes"]) == 3 else 1)' <<<"$s"
}

brokers_up() {
    local n
    for n in "${NODES[@]}"; do start_node "$n"; done
    for n in r2 r3; do
        ctl "$n" stop_app >/dev/null 2>&1
        ctl "$n" reset >/dev/null 2>&1
        ctl "$n" join_cluster "$(node_name r1)" >/dev/null 2>&1 || die "$n could not join r1 (see $NETLAB_DIR/$n/log)"
        ctl "$n" start_app >/dev/null 2>&1
    done
    wait_until "three running broker nodes" three_running
    log "broker cluster up: $(urls)"
}

kill_node() {
    local pid
    pid=$(beam_pid "$1")
    [[ -n "$pid" ]] || die "$1 is not running"
    log "SIGKILL $1 (pid $pid)"
    kill -9 "$pid"
}

urls() {
    local out=() n
    for n in "${NODES[@]}"; do out+=("amqp://guest:guest@$(addr "$n"):5672/%2f"); done
    (IFS=,; echo "${out[*]}")
}

# --- PostgreSQL and Redis -----------------------------------------------------

# Each server its own folder: both use port 5432, and their sockets live there.
pg_data() { echo "$NETLAB_DIR/pg-$1/data"; }

redis_answers() { [[ "$(in_ns c redis-cli -h "$(addr redis)" ping 2>/dev/null)" == PONG ]]; }

databases_up() {
    in_ns db "$ROOT/scripts/replica.sh" primary "$(pg_data db)" "$(addr db)" 5432 "$NET.0/24"
    in_ns replica "$ROOT/scripts/replica.sh" standby "$(pg_data replica)" "$(addr replica)" 5432 "$NET.0/24" \
        "$(addr db)" 5432
    # Protected mode would refuse every host but its own: the lab's network
    # exists only inside its namespaces.
    in_ns redis redis-server --bind "$(addr redis)" --port 6379 --save "" --appendonly no --protected-mode no \
        --daemonize yes --pidfile "$NETLAB_DIR/redis.pid" --dir "$NETLAB_DIR" --logfile "$NETLAB_DIR/redis.log"
    # Asked from the clients' host: an answer from another host is the one that counts.
    wait_until "Redis" redis_answers
}

# The standby's apply delay, changed in place (a reload is enough).
lag() {
    "$ROOT/scripts/replica.sh" delay "$(pg_data replica)" "${1}s"
    log "standby applies commits ${1}s late"
}

# --- faults -------------------------------------------------------------------

# No MAC on the lab's bridge: frames sent to it are lost without a trace.
NOWHERE=02:00:00:00:00:01

# Packets from A to each of B... are lost.
drop_to() { # A B...
    local a=$1 b
    shift
    for b in "$@"; do
        ip -n "$(ns "$a")" neigh replace "$(addr "$b")" lladdr $NOWHERE dev eth0 nud permanent
    done
}

cut() { # A B,C
    local a=$1 b
    IFS=, read -r -a others <<<"$2"
    drop_to "$a" "${others[@]}"
    for b in "${others[@]}"; do drop_to "$b" "$a"; done
    log "cut $a from ${others[*]}"
}

cut_from() { # A B: B's packets to A are lost
    drop_to "$2" "$1"
    log "cut $1 from $2, one way: $2 → $1 lost"
}

# Whether this kernel has netem (sch_netem): some do not, and no slow link
# can be made there.
can_slow() { in_ns c tc qdisc replace dev lo root netem delay 1ms 2>/dev/null && in_ns c tc qdisc del dev lo root; }

slow() { # HOST SPEC
    local h=$1
    can_slow || die "this kernel has no netem (sch_netem): no slow or lossy link can be made here"
    read -r -a spec <<<"$2"
    in_ns "$h" tc qdisc replace dev eth0 root netem "${spec[@]}"
    log "$h: $2"
}

heal() {
    local h
    for h in "${HOSTS[@]}"; do
        ip netns list | grep -qw "$(ns "$h")" || continue
        ip -n "$(ns "$h")" neigh flush dev eth0 nud permanent 2>/dev/null || true
        in_ns "$h" tc qdisc del dev eth0 root 2>/dev/null || true
    done
    log "healed: no cut, no slow link"
}

# --- up and down --------------------------------------------------------------

down() {
    local n pid
    for n in db replica; do "$ROOT/scripts/replica.sh" stop "$(pg_data "$n")" 2>/dev/null || true; done
    for n in "${NODES[@]}"; do
        pid=$(beam_pid "$n")
        if [[ -n "$pid" ]]; then kill -9 "$pid" 2>/dev/null || true; fi
    done
    # Whatever else runs in a lab namespace (epmd, gateways, servers) goes too.
    for n in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" || true); do
        for pid in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    done
    for n in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" || true); do ip netns del "$n"; done
    rm -rf "$NETLAB_DIR"
}

up() {
    check_allowed
    down
    mkdir -p "$NETLAB_DIR"
    chmod 755 "$NETLAB_DIR"
    # A failed start leaves nothing behind.
    trap 'rc=$?; if ((rc != 0)); then log "up failed: tearing down"; down; fi' EXIT
    hosts_up
    databases_up
    brokers_up
    trap - EXIT
    log "up: $(urls) · postgres://postgres@$(addr db):5432 (standby $(addr replica)) · redis://$(addr redis):6379"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    run) in_ns "$2" "${@:3}" ;;
    addr) addr "$2" ;;
    urls) urls ;;
    cut) cut "$2" "$3" ;;
    cut-from) cut_from "$2" "$3" ;;
    slow) slow "$2" "$3" ;;
    can-slow) can_slow ;;
    heal) heal ;;
    lag) lag "$2" ;;
    kill) kill_node "$2" ;;
    start) start_node "$2" ;;
    *) sed -n '2,28s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac
