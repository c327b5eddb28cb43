#!/usr/bin/env bash
# A three-node RabbitMQ cluster on loopback, from the machine's RabbitMQ
# install, beside the machine's own broker; and, for `make cluster`, gateway
# instances behind HAProxy. Everything lives under $CLUSTER_DIR.
#
#   scripts/cluster.sh nodes        the three broker nodes, clustered
#   scripts/cluster.sh up           nodes, PostgreSQL/Redis, gateways, HAProxy; prints the URLs
#   scripts/cluster.sh down         stops all of it and removes $CLUSTER_DIR
#   scripts/cluster.sh kill NODE    SIGKILL one node (c1, c2 or c3)
#   scripts/cluster.sh stop NODE    stops one node gracefully
#   scripts/cluster.sh start NODE   starts one node again (it rejoins)
#   scripts/cluster.sh leader VHOST QUEUE  the node that leads a queue (a stream: its writer)
#   scripts/cluster.sh urls         the nodes' AMQP URLs, comma-separated
#
# Node cN: AMQP 127.0.0.1:57N, management 157N, distribution 257N (N = 01..03).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER_DIR=${CLUSTER_DIR:-/tmp/product-gateway-cluster}
NODES=(c1 c2 c3)
GATEWAYS=${CLUSTER_GATEWAYS:-3}
LB_PORT=${CLUSTER_LB_PORT:-8090}
DB_URL=${CLUSTER_DB_URL:-postgres://postgres@127.0.0.1:5432/product_gateway_cluster}
WAIT_SECS=${CLUSTER_WAIT_SECS:-90}

log() { echo "cluster: $*" >&2; }
die() { log "$*"; exit 1; }

index() { case $1 in c1) echo 1 ;; c2) echo 2 ;; c3) echo 3 ;; *) die "no node $1 (c1, c2, c3)" ;; esac; }
amqp_port() { echo $((5700 + $(index "$1"))); }
mgmt_port() { echo $((15700 + $(index "$1"))); }
dist_port() { echo $((25700 + $(index "$1"))); }
gateway_port() { echo $((8090 + $1)); }

ctl() { rabbitmqctl -q -n "$1@localhost" "${@:2}"; }

urls() {
    local out=() n
    for n in "${NODES[@]}"; do out+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f"); done
    (IFS=,; echo "${out[*]}")
}

wait_until() {
    local what=$1 i
    shift
    for ((i = 0; i < WAIT_SECS; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    die "timed out after ${WAIT_SECS}s waiting for $what"
}

beam_pid() { cat "$CLUSTER_DIR/$1/pid" 2>/dev/null || true; }
running() { local pid; pid=$(beam_pid "$1"); [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; }

start_node() {
    local n=$1 dir="$CLUSTER_DIR/$1" want hard
    running "$n" && { log "$n already running"; return 0; }
    command -v rabbitmq-server >/dev/null || die "rabbitmq-server is not installed (scripts/services.sh installs it)"
    mkdir -p "$dir/mnesia" "$dir/log"
    cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$(amqp_port "$n")
management.tcp.ip = 127.0.0.1
management.tcp.port = $(mgmt_port "$n")
loopback_users = none
max_message_size = 262144
EOF
    echo "[rabbitmq_management]." >"$dir/enabled_plugins"
    : >"$dir/rabbitmq-env.conf"
    chown -R rabbitmq:rabbitmq "$dir"
    want=65536
    hard=$(ulimit -Hn)
    if [[ "$hard" != unlimited ]] && ((want > hard)); then want=$hard; fi
    log "starting $n@localhost (AMQP $(amqp_port "$n"), management $(mgmt_port "$n"), open files $want)"
    (
        ulimit -n "$want"
        cd "$dir"
        # setpriv switches user without PAM, so the limit set here stays; the
        # machine's cookie (HOME) is shared by every node and by rabbitmqctl.
        setsid setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
            env HOME=/var/lib/rabbitmq USER=rabbitmq LOGNAME=rabbitmq \
            RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
            RABBITMQ_NODENAME="$n@localhost" \
            RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
            RABBITMQ_DIST_PORT="$(dist_port "$n")" \
            RABBITMQ_MNESIA_BASE="$dir/mnesia" \
            RABBITMQ_LOG_BASE="$dir/log" \
            RABBITMQ_PID_FILE="$dir/pid" \
            RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
            RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+S 1:1 +A 4" \
            ERL_EPMD_ADDRESS=127.0.0.1 \
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}" \
            /usr/lib/rabbitmq/bin/rabbitmq-server >"$dir/log/startup.log" 2>&1 </dev/null &
    )
    wait_until "$n to boot" ctl "$n" await_startup
}

nodes() {
    local n
    mkdir -p "$CLUSTER_DIR"
    chmod 755 "$CLUSTER_DIR"
    for n in "${NODES[@]}"; do start_node "$n"; done
    for n in c2 c3; do
        if ctl c1 cluster_status --formatter json 2>/dev/null | grep -q "\"$n@localhost\"" &&
            ctl "$n" cluster_status --formatter json 2>/dev/null | grep -q '"c1@localhost"'; then
            continue
        fi
        log "joining $n to c1"
        # rabbitmqctl prints the node's boot warnings here; the log has them.
        ctl "$n" stop_app >/dev/null 2>&1
        ctl "$n" reset >/dev/null 2>&1
        ctl "$n" join_cluster c1@localhost >/dev/null 2>&1 || die "$n could not join c1 (see $CLUSTER_DIR/$n/log)"
        ctl "$n" start_app >/dev/null 2>&1
    done
    wait_until "three running nodes" three_running
    log "cluster of c1, c2, c3 up: $(urls)"
}

three_running() {
    local s
    s=$(ctl c1 cluster_status --formatter json) || return 1
    python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if len(d["running_nodes"]) == 3 else 1)' <<<"$s"
}

kill_node() {
    local pid
    pid=$(beam_pid "$1")
    [[ -n "$pid" ]] || die "$1 is not running"
    log "SIGKILL $1 (pid $pid)"
    kill -9 "$pid"
    local i
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
}

stop_node() { log "stopping $1"; ctl "$1" stop; }

leader() {
    local vhost=$1 q=$2 n
    [[ "$vhost" == / ]] && vhost=%2f
    for n in "${NODES[@]}"; do
        running "$n" || continue
        curl -sf -u guest:guest "http://127.0.0.1:$(mgmt_port "$n")/api/queues/$vhost/$q" |
            python3 -c 'import json,sys; q=json.load(sys.stdin); print((q.get("leader") or q["node"]).split("@")[0])' && return 0
    done
    die "no running node knows queue $q"
}

# ------------------------------------------------------------ gateways + LB

haproxy_cfg() {
    local i
    cat <<EOF
# Written by scripts/cluster.sh: the load balancer in front of the gateways.
# WebSocket and SSE pass through: long-lived connections need the tunnel and
# server time-outs above the gateways' keep-alives (15 s). No sticky sessions:
# any gateway serves any client, and a resume works on any of them.
global
    # Two open files per connection (client and gateway side), within the
    # machine's limit of 20,000.
    maxconn 9000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    option forwardfor
frontend gateways
    bind 127.0.0.1:$LB_PORT
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
EOF
    for ((i = 1; i <= GATEWAYS; i++)); do
        echo "    server g$i 127.0.0.1:$(gateway_port "$i") check inter 1s fall 2 rise 1"
    done
}

start_gateway() {
    local i=$1 dir="$CLUSTER_DIR/g$1" generator=false
    mkdir -p "$dir"
    if [[ -f "$dir/pid" ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then return 0; fi
    # One generator for the whole deployment.
    ((i == 1)) && generator=true
    log "starting gateway g$i on 127.0.0.1:$(gateway_port "$i")"
    (
        ulimit -n "$(ulimit -Hn)"
        cd "$ROOT"
        GATEWAY__SERVER__HOST=127.0.0.1 \
            GATEWAY__SERVER__PORT="$(gateway_port "$i")" \
            GATEWAY__SERVER__TRUSTED_PROXIES=127.0.0.1 \
            GATEWAY__DATABASE__URL="$DB_URL" \
            GATEWAY__REDIS__KEY_PREFIX="gw-cluster:" \
            GATEWAY__RABBIT__URLS="$(urls)" \
            GATEWAY__RABBIT__MANAGEMENT_URL="http://127.0.0.1:$(mgmt_port c1)" \
            GATEWAY__RABBIT__TOPOLOGY__REPLICAS=3 \
            GATEWAY__GENERATOR__ENABLED=$generator \
            GATEWAY__ADMIN__DEV_MODE=true \
            setsid "$ROOT/target/release/product-gateway" serve >"$dir/log" 2>&1 </dev/null &
        echo $! >"$dir/pid"
    )
}

gateway_ready() { curl -sf "http://127.0.0.1:$(gateway_port "$1")/readyz"; }

up() {
    "$ROOT/scripts/services.sh" ensure >&2
    "$ROOT/scripts/tools.sh" haproxy
    nodes
    [[ -x "$ROOT/target/release/product-gateway" ]] || (cd "$ROOT" && cargo build --release --bin product-gateway)
    (cd "$ROOT" && GATEWAY__DATABASE__URL="$DB_URL" target/release/product-gateway seed >&2)
    local i
    for ((i = 1; i <= GATEWAYS; i++)); do
        start_gateway "$i"
        wait_until "gateway g$i" gateway_ready "$i"
    done
    haproxy_cfg >"$CLUSTER_DIR/haproxy.cfg"
    if [[ -f "$CLUSTER_DIR/haproxy.pid" ]] && kill -0 "$(cat "$CLUSTER_DIR/haproxy.pid")" 2>/dev/null; then
        kill "$(cat "$CLUSTER_DIR/haproxy.pid")" || true
    fi
    haproxy -D -f "$CLUSTER_DIR/haproxy.cfg" -p "$CLUSTER_DIR/haproxy.pid"
    wait_until "the load balancer" curl -sf "http://127.0.0.1:$LB_PORT/readyz"
    echo
    echo "  load balancer    http://127.0.0.1:$LB_PORT/   (REST /products, SSE /events, WebSocket /ws, echo page /)"
    for ((i = 1; i <= GATEWAYS; i++)); do
        echo "  gateway g$i       http://127.0.0.1:$(gateway_port "$i")/   (log $CLUSTER_DIR/g$i/log)"
    done
    for n in "${NODES[@]}"; do
        echo "  RabbitMQ $n      amqp://127.0.0.1:$(amqp_port "$n")   management http://127.0.0.1:$(mgmt_port "$n")/ (guest / guest)"
    done
    echo "  database         $DB_URL"
    echo "  stop it all      make cluster-stop"
    echo
}

down() {
    local f n
    for f in "$CLUSTER_DIR"/g*/pid "$CLUSTER_DIR/haproxy.pid"; do
        [[ -f "$f" ]] || continue
        kill "$(cat "$f")" 2>/dev/null || true
    done
    for n in "${NODES[@]}"; do
        if running "$n"; then
            ctl "$n" stop >/dev/null 2>&1 || kill -9 "$(beam_pid "$n")" 2>/dev/null || true
        fi
    done
    for n in "${NODES[@]}"; do
        local i
        for ((i = 0; i < 100; i++)); do running "$n" || break; sleep 0.2; done
    done
    rm -rf "$CLUSTER_DIR"
    log "cluster stopped"
}

case ${1:-} in
    nodes) nodes ;;
    up) up ;;
    down) down ;;
    kill) kill_node "${2:?node}" ;;
    stop) stop_node "${2:?node}" ;;
    start) start_node "${2:?node}"; wait_until "three running nodes" three_running ;;
    leader) leader "${2:?vhost}" "${3:?queue}" ;;
    urls) urls ;;
    *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
