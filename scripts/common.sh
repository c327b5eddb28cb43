# Shared by the scripts in this folder (sourced, not run): where the
# services answer, logging, probes, bounded waits and Debian installs.
# A script sets SCRIPT_NAME before sourcing it, for its log lines.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Debian keeps the server tools in sbin, which a non-login shell may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive

HOST=127.0.0.1
PG_PORT=5432
REDIS_PORT=6379
AMQP_PORT=5672
MGMT_PORT=15672
RABBIT_USER="${RABBIT_USER:-guest}"
RABBIT_PASS="${RABBIT_PASS:-guest}"
RABBIT_VHOST="${RABBIT_VHOST:-/}"
MGMT_URL="http://${HOST}:${MGMT_PORT}"
# Bound of every wait loop, in seconds.
WAIT_SECS="${SERVICES_WAIT_SECS:-60}"
COMPOSE_FILE="docker/compose.yml"
DEFINITIONS="${RABBIT_DEFINITIONS:-rabbit/definitions.json}"
REDIS_DIR=/var/lib/redis
REDIS_LOG_DIR=/var/log/redis

log() { printf '%s: %s\n' "${SCRIPT_NAME:-scripts}" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# --- probes ----------------------------------------------------------------

tcp_open() { # host port
    timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2" >/dev/null 2>&1
}

pg_up() {
    if have pg_isready; then
        pg_isready -q -h "$HOST" -p "$PG_PORT" -t 3 >/dev/null 2>&1
    else
        tcp_open "$HOST" "$PG_PORT"
    fi
}

redis_up() {
    if have redis-cli; then
        [[ "$(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
    else
        tcp_open "$HOST" "$REDIS_PORT"
    fi
}

# The AMQP listener opens once the broker has booted; a TCP check also covers
# a broker this machine's rabbitmq-diagnostics cannot reach (container, other
# Erlang cookie).
rabbit_up() { tcp_open "$HOST" "$AMQP_PORT"; }

mgmt_up() {
    curl -sf -o /dev/null --max-time 5 -u "${RABBIT_USER}:${RABBIT_PASS}" "${MGMT_URL}/api/overview"
}

wait_for() { # name probe-function
    local name=$1 probe=$2 deadline=$((SECONDS + WAIT_SECS))
    log "waiting for ${name} (up to ${WAIT_SECS}s)"
    until "$probe"; do
        if ((SECONDS >= deadline)); then
            die "${name} did not answer within ${WAIT_SECS}s"
        fi
        sleep 1
    done
    log "${name} answers"
}

docker_engine() { have docker && docker info >/dev/null 2>&1; }

is_debian_root() { [[ -r /etc/debian_version && "$(id -u)" == 0 ]] && have apt-get; }

APT_UPDATED=0
apt_install() { # packages...
    if ((APT_UPDATED == 0)); then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    apt-get install -y -qq --no-install-recommends "$@" >&2
}
