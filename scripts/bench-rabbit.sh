#!/usr/bin/env bash
# RabbitMQ preparation for the benchmark's Web-STOMP comparison.
#
#   bench-rabbit.sh prepare FDS   make sure the local broker may open FDS files
#                                 and that rabbitmq_web_stomp is enabled
#   bench-rabbit.sh restore       disable rabbitmq_web_stomp again if prepare
#                                 enabled it
#
# Debian's start script runs the broker under `su`, which resets the
# open-files limit to 1024: RabbitMQ then keeps about 830 of them for
# sockets, and 1,000 Web-STOMP clients fail. `prepare` restarts the local
# broker with the limit raised (as the rabbitmq user, with setpriv, which
# keeps the limit) only when no client is connected to it at that moment,
# since a restart would cut other users off. Otherwise it leaves the broker
# alone and reports the limit, and the bench sizes the comparison to fit.
#
# Prints key=value lines on stdout: limit_before, limit, restarted,
# skipped_restart (reason), web_stomp_enabled_here.
set -euo pipefail

MGMT_URL="${RABBIT_MGMT_URL:-http://127.0.0.1:15672}"
AUTH="${RABBIT_USER:-guest}:${RABBIT_PASS:-guest}"
STATE_DIR="${BENCH_STATE_DIR:-/tmp/product-gateway-bench}"
WAIT_SECS=90

log() { printf 'bench-rabbit: %s\n' "$*" >&2; }

# By process name: a pattern on the command line would also match any shell
# whose arguments mention it.
beam_pid() { pgrep -x beam.smp | head -1 || true; }

beam_gone() { [[ -z "$(beam_pid)" ]]; }

soft_limit() {
    local pid
    pid=$(beam_pid)
    [[ -n "$pid" ]] || { echo 0; return; }
    awk '/^Max open files/ {print $4}' "/proc/$pid/limits"
}

api() { curl -sf --max-time 10 -u "$AUTH" "$MGMT_URL$1"; }

mgmt_up() { api /api/overview >/dev/null 2>&1; }

connections() {
    api /api/connections | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))'
}

wait_until() { # description command...
    local what=$1
    shift
    local i
    for ((i = 0; i < WAIT_SECS; i++)); do
        if "$@"; then return 0; fi
        sleep 1
    done
    log "timed out after ${WAIT_SECS}s waiting for $what"
    return 1
}

local_broker() { [[ -n "$(beam_pid)" ]] && command -v rabbitmqctl >/dev/null && [[ "$(id -u)" == 0 ]]; }

restart_with_limit() {
    local want=$1 hard
    hard=$(ulimit -Hn)
    if [[ "$hard" != unlimited ]] && ((want > hard)); then want=$hard; fi
    log "stopping RabbitMQ (limit $(soft_limit)) to restart it with an open-files limit of $want"
    rabbitmqctl -q stop >&2 || true
    wait_until "the broker to stop" beam_gone
    log "starting RabbitMQ as user rabbitmq with ulimit -n $want"
    (
        ulimit -n "$want"
        cd /var/lib/rabbitmq
        # setpriv switches user without PAM, so the limit set here stays.
        setsid setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
            env HOME=/var/lib/rabbitmq USER=rabbitmq LOGNAME=rabbitmq \
            /usr/lib/rabbitmq/bin/rabbitmq-server \
            >/var/log/rabbitmq/startup_log 2>/var/log/rabbitmq/startup_err </dev/null &
    )
    wait_until "the management API" mgmt_up
    wait_until "the node to boot" rabbitmqctl -q await_startup
}

prepare() {
    local want=$1 before restarted=no skipped=""
    mkdir -p "$STATE_DIR"
    before=$(soft_limit)
    echo "limit_before=$before"
    if ((before < want)); then
        if ! local_broker; then
            skipped="the broker is not a local process this script can restart"
        else
            local n
            n=$(connections)
            if ((n > 0)); then
                skipped="$n client connection(s) open: the broker is in use"
            else
                restart_with_limit "$want"
                restarted=yes
            fi
        fi
    fi
    [[ -z "$skipped" ]] || log "not restarting RabbitMQ: $skipped"
    echo "restarted=$restarted"
    echo "skipped_restart=$skipped"
    echo "limit=$(soft_limit)"

    local enabled_here=no
    if command -v rabbitmq-plugins >/dev/null; then
        if ! rabbitmq-plugins -q list -e -m 2>/dev/null | grep -qx rabbitmq_web_stomp; then
            log "rabbitmq-plugins enable rabbitmq_web_stomp"
            rabbitmq-plugins -q enable rabbitmq_web_stomp >&2
            enabled_here=yes
            touch "$STATE_DIR/web_stomp_enabled_here"
        fi
    fi
    echo "web_stomp_enabled_here=$enabled_here"
}

restore() {
    if [[ -e "$STATE_DIR/web_stomp_enabled_here" ]]; then
        # rabbitmq_stomp came along as a dependency and goes with it.
        log "rabbitmq-plugins disable rabbitmq_web_stomp (enabled by the bench)"
        rabbitmq-plugins -q disable rabbitmq_web_stomp >&2 || true
        rm -f "$STATE_DIR/web_stomp_enabled_here"
    fi
}

case "${1:-}" in
prepare) prepare "${2:?open-files limit wanted}" ;;
restore) restore ;;
limit) soft_limit ;;
*)
    echo "usage: $0 prepare FDS | restore | limit" >&2
    exit 2
    ;;
esac
