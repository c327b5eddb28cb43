#!/usr/bin/env bash
# Faults for the chaos run (tests/service_restarts), on local services only:
# each command leaves the service as it says, and waits until it does.
#
# Usage: scripts/faults.sh restart-postgres|stop-redis|start-redis|restart-rabbitmq
#
# Every action is logged, one line each, on stderr.
set -euo pipefail

# The start functions and probes of scripts/services.sh.
# shellcheck source=scripts/services.sh
source "$(dirname "${BASH_SOURCE[0]}")/services.sh"
SCRIPT_NAME=faults

restart_postgres() {
    local v
    v=$(pg_cluster_version)
    log "restarting PostgreSQL ${v}"
    pg_ctlcluster --skip-systemctl-redirect "$v" main restart >&2
    wait_for PostgreSQL pg_up
}

stop_redis() {
    log "stopping Redis"
    redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
}

start_redis() {
    redis_up || redis_start_local
}

restart_rabbitmq() {
    log "restarting the RabbitMQ application (stop_app, start_app)"
    rabbitmqctl -q stop_app >&2
    rabbitmqctl -q start_app >&2
    wait_for RabbitMQ rabbit_up
}

usage() {
    cat >&2 <<EOF
usage: $0 <command>
  restart-postgres   restart the local PostgreSQL cluster; wait until it answers
  stop-redis         shut Redis down (no save)
  start-redis        start Redis if it does not answer
  restart-rabbitmq   stop and start the RabbitMQ application; wait until it answers
EOF
}

case "${1:-}" in
restart-postgres) restart_postgres ;;
stop-redis) stop_redis ;;
start-redis) start_redis ;;
restart-rabbitmq) restart_rabbitmq ;;
-h | --help | help) usage ;;
*)
    usage
    exit 2
    ;;
esac
