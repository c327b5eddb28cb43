#!/usr/bin/env bash
# Makes sure PostgreSQL, Redis and RabbitMQ (with the management and stream
# plugins) answer on their default local ports, whatever this machine has:
#
#   1. a service that already answers is left alone;
#   2. otherwise, with a Docker engine, docker/compose.yml starts it;
#   3. otherwise, if it is installed, it is started locally;
#   4. otherwise, on Debian as root, it is installed with apt-get, then started;
#   5. otherwise the script says what to install and exits 1.
#
# Idempotent: running it again when everything answers only checks.
# Tools the tests need are scripts/tools.sh's; the chaos run's faults are
# scripts/faults.sh's (which sources this file for its start functions).
#
# Usage: scripts/services.sh ensure|definitions|status
#
# Every action is logged, one line each, on stderr.
set -euo pipefail

SCRIPT_NAME=services
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# --- PostgreSQL ------------------------------------------------------------

pg_installed() { have pg_ctlcluster && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; }

# Newest installed server version (e.g. 15).
pg_version() {
    local v
    v=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
    [[ -n "$v" ]] || die "no PostgreSQL server under /usr/lib/postgresql"
    printf '%s\n' "$v"
}

# Version of the cluster to start: the one under /etc/postgresql if any.
pg_cluster_version() {
    local v=""
    if [[ -d /etc/postgresql ]]; then
        v=$(find /etc/postgresql -mindepth 2 -maxdepth 2 -name main -printf '%h\n' 2>/dev/null |
            xargs -r -n1 basename | sort -V | tail -n 1)
    fi
    if [[ -z "$v" ]]; then
        v=$(pg_version)
        log "creating PostgreSQL ${v} cluster 'main'"
        pg_createcluster "$v" main >&2
    fi
    printf '%s\n' "$v"
}

pg_trust_ok() {
    have psql || return 0
    psql -h "$HOST" -p "$PG_PORT" -U postgres -w -d postgres -tAc 'select 1' >/dev/null 2>&1
}

# Only for a cluster this script started or installed: lets user postgres in
# without a password over 127.0.0.1 and ::1 (local development and CI only).
pg_ensure_trust() { # version
    local v=$1 hba="/etc/postgresql/$1/main/pg_hba.conf" tmp
    if pg_trust_ok; then
        return 0
    fi
    [[ -w "$hba" ]] || die "cannot log in as postgres on ${HOST} and cannot edit ${hba}; allow 'host all postgres 127.0.0.1/32 trust'"
    log "adding trust for user postgres on 127.0.0.1 and ::1 to ${hba}, reloading"
    tmp=$(mktemp)
    {
        echo "# added by scripts/services.sh (local development and CI only)"
        echo "host all postgres 127.0.0.1/32 trust"
        echo "host all postgres ::1/128 trust"
        cat "$hba"
    } >"$tmp"
    cat "$tmp" >"$hba"
    rm -f "$tmp"
    pg_ctlcluster --skip-systemctl-redirect "$v" main reload >&2
    sleep 1
    pg_trust_ok || die "still cannot log in as postgres on ${HOST} without a password; check ${hba}"
}

pg_start_local() {
    local v
    v=$(pg_cluster_version)
    log "starting PostgreSQL ${v} (pg_ctlcluster ${v} main start)"
    pg_ctlcluster --skip-systemctl-redirect "$v" main start >&2 || true
    wait_for PostgreSQL pg_up
    pg_ensure_trust "$v"
}

# --- Redis -----------------------------------------------------------------

redis_start_local() {
    local dir=$REDIS_DIR logdir=$REDIS_LOG_DIR
    mkdir -p "$dir" "$logdir" 2>/dev/null || true
    if [[ ! -w "$dir" || ! -w "$logdir" ]]; then
        dir="${TMPDIR:-/tmp}/gateway-redis"
        logdir=$dir
        mkdir -p "$dir"
    fi
    log "starting redis-server on ${HOST}:${REDIS_PORT} (log ${logdir}/ci.log)"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir "$dir" --logfile "$logdir/ci.log" >&2
    wait_for Redis redis_up
}

# --- RabbitMQ --------------------------------------------------------------

# max_message_size the gateway expects of its broker (docker/rabbitmq.conf,
# equal to rabbit.topology.max_message_bytes; a test keeps them equal).
rabbit_max_message_size() {
    sed -n 's/^max_message_size *= *\([0-9]*\).*/\1/p' docker/rabbitmq.conf
}

# Only for a broker this script starts: its conf.d gets the gateway's message
# size limit, so oversize events are refused at publish (node-wide setting).
rabbit_install_limits() {
    local dir=/etc/rabbitmq/conf.d file limit
    limit=$(rabbit_max_message_size)
    file="$dir/20-gateway-limits.conf"
    [[ -n "$limit" ]] || return 0
    if [[ -d "$dir" && -w "$dir" ]] || { [[ ! -e "$dir" && -w /etc/rabbitmq ]] && mkdir -p "$dir"; }; then
        log "writing max_message_size = ${limit} to ${file}"
        printf '# written by scripts/services.sh: the gateway'"'"'s message size limit\nmax_message_size = %s\n' "$limit" >"$file"
    else
        log "WARNING: cannot write ${file}: the broker keeps its default message size limit (128 MiB)"
    fi
}

# Read-only: says when a running broker's limit differs from the gateway's.
rabbit_check_limits() {
    local want have_limit
    want=$(rabbit_max_message_size)
    have rabbitmqctl || return 0
    have_limit=$(rabbitmqctl -q eval 'application:get_env(rabbit, max_message_size).' 2>/dev/null |
        sed -n 's/^{ok,\([0-9]*\)}$/\1/p') || true
    if [[ -n "$want" && -n "$have_limit" && "$have_limit" != "$want" ]]; then
        log "WARNING: the broker accepts messages up to ${have_limit} bytes, the gateway expects ${want} (max_message_size in docker/rabbitmq.conf); oversize events are then refused only after delivery"
    fi
}

rabbit_start_local() {
    rabbit_install_limits
    log "starting rabbitmq-server -detached (open-files limit raised to 65536, or to the hard limit)"
    (
        # Best effort: containers often cap the hard limit below 65536.
        ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
        rabbitmq-server -detached >&2
    )
    wait_for RabbitMQ rabbit_up
}

rabbit_enable_plugins() {
    local enabled missing=() p
    if ! have rabbitmq-plugins; then
        log "rabbitmq-plugins not installed here (broker elsewhere?): not enabling plugins"
        return 0
    fi
    if ! enabled=$(rabbitmq-plugins -q list -e -m 2>/dev/null); then
        log "WARNING: rabbitmq-plugins cannot reach the broker: not enabling plugins"
        return 0
    fi
    for p in rabbitmq_management rabbitmq_stream; do
        grep -qx "$p" <<<"$enabled" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "RabbitMQ plugins rabbitmq_management and rabbitmq_stream already enabled"
        return 0
    fi
    log "rabbitmq-plugins enable ${missing[*]}"
    if ! rabbitmq-plugins -q enable "${missing[@]}" >&2; then
        # Node not reachable: record them so the next boot loads them.
        log "online enable failed, retrying with --offline (takes effect at the next broker start)"
        rabbitmq-plugins -q enable --offline "${missing[@]}" >&2
    fi
}

# --- subcommands -----------------------------------------------------------

ensure() {
    local missing=() name
    if pg_up; then log "PostgreSQL answers on ${HOST}:${PG_PORT}"; else missing+=(postgres); fi
    if redis_up; then log "Redis answers on ${HOST}:${REDIS_PORT}"; else missing+=(redis); fi
    if rabbit_up; then log "RabbitMQ answers on ${HOST}:${AMQP_PORT}"; else missing+=(rabbitmq); fi
    if ((${#missing[@]} > 0)); then log "not answering: ${missing[*]}"; fi

    if ((${#missing[@]} > 0)); then
        if docker_engine; then
            log "Docker engine found: docker compose -f ${COMPOSE_FILE} up -d ${missing[*]}"
            if docker compose version >/dev/null 2>&1; then
                docker compose -f "$COMPOSE_FILE" up -d "${missing[@]}" >&2
            elif have docker-compose; then
                docker-compose -f "$COMPOSE_FILE" up -d "${missing[@]}" >&2
            else
                die "Docker engine found but neither 'docker compose' nor 'docker-compose'"
            fi
            for name in "${missing[@]}"; do
                case $name in
                postgres) wait_for PostgreSQL pg_up ;;
                redis) wait_for Redis redis_up ;;
                rabbitmq) wait_for RabbitMQ rabbit_up ;;
                esac
            done
        else
            local to_install=() pkgs=()
            for name in "${missing[@]}"; do
                case $name in
                postgres) pg_installed || { to_install+=(postgres) && pkgs+=(postgresql postgresql-client); } ;;
                redis) have redis-server || { to_install+=(redis) && pkgs+=(redis-server redis-tools); } ;;
                rabbitmq) have rabbitmq-server || { to_install+=(rabbitmq) && pkgs+=(rabbitmq-server); } ;;
                esac
            done
            if ((${#pkgs[@]} > 0)); then
                if is_debian_root; then
                    log "not installed: ${to_install[*]}; no Docker engine; installing with apt-get"
                    apt_install "${pkgs[@]}"
                else
                    die "no Docker engine, and not installed: ${to_install[*]}. Install ${pkgs[*]} (Debian/Ubuntu: sudo apt-get install -y ${pkgs[*]}), or start a Docker engine and rerun, or run the services yourself on ${HOST} ports ${PG_PORT}/${REDIS_PORT}/${AMQP_PORT}."
                fi
            fi
            # Package scripts may have started a service already.
            local v
            for name in "${missing[@]}"; do
                case $name in
                postgres)
                    if pg_up; then
                        log "PostgreSQL answers now"
                        v=$(pg_cluster_version)
                        pg_ensure_trust "$v"
                    else
                        pg_start_local
                    fi
                    ;;
                redis)
                    if redis_up; then log "Redis answers now"; else redis_start_local; fi
                    ;;
                rabbitmq)
                    if rabbit_up; then log "RabbitMQ answers now"; else rabbit_start_local; fi
                    ;;
                esac
            done
        fi
    fi

    if ! pg_trust_ok; then
        log "WARNING: PostgreSQL answers but user postgres cannot log in on ${HOST} without a password (tests expect trust auth)"
    fi

    rabbit_enable_plugins
    rabbit_check_limits
    if mgmt_up; then
        log "RabbitMQ management API answers at ${MGMT_URL}/"
    else
        wait_for "RabbitMQ management API (${MGMT_URL}/api/overview)" mgmt_up
    fi
    log "all services up"
}

definitions() {
    local vhost_enc body code
    [[ -f "$DEFINITIONS" ]] || die "${DEFINITIONS} not found"
    mgmt_up || wait_for "RabbitMQ management API" mgmt_up
    vhost_enc=$(printf '%s' "$RABBIT_VHOST" | sed 's|%|%25|g; s|/|%2F|g')
    log "loading ${DEFINITIONS} into vhost '${RABBIT_VHOST}' (POST ${MGMT_URL}/api/definitions/${vhost_enc})"
    body=$(mktemp)
    code=$(curl -sS -o "$body" -w '%{http_code}' --max-time 60 \
        -u "${RABBIT_USER}:${RABBIT_PASS}" -H 'content-type: application/json' \
        -X POST --data-binary "@${DEFINITIONS}" \
        "${MGMT_URL}/api/definitions/${vhost_enc}") || code=000
    if [[ "$code" != 2* ]]; then
        log "ERROR: definitions import failed with HTTP ${code}: $(head -c 2000 "$body")"
        rm -f "$body"
        exit 1
    fi
    rm -f "$body"
    log "definitions loaded (HTTP ${code})"
}

status() {
    local rc=0
    if pg_up; then log "PostgreSQL: up"; else log "PostgreSQL: down" && rc=1; fi
    if redis_up; then log "Redis: up"; else log "Redis: down" && rc=1; fi
    if rabbit_up; then log "RabbitMQ: up"; else log "RabbitMQ: down" && rc=1; fi
    if mgmt_up; then log "RabbitMQ management API: up"; else log "RabbitMQ management API: down" && rc=1; fi
    return "$rc"
}

usage() {
    cat >&2 <<EOF
usage: $0 <command>
  ensure       start whatever of PostgreSQL, Redis, RabbitMQ does not answer;
               enable rabbitmq_management and rabbitmq_stream; wait for the
               management API
  definitions  load ${DEFINITIONS} into vhost '${RABBIT_VHOST}' via the management API
  status       report which services answer (exit 1 if any does not)
EOF
}

# Sourced (by scripts/faults.sh): functions only.
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0

case "${1:-}" in
ensure) ensure ;;
definitions) definitions ;;
status) status ;;
-h | --help | help) usage ;;
*)
    usage
    exit 2
    ;;
esac
