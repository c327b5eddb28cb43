#!/usr/bin/env bash
# A PostgreSQL primary with two streaming standbys on loopback, beside the
# machine's own PostgreSQL: what snapshots served from a read replica are
# tested against. Everything lives under $REPLICA_DIR and runs as the
# postgres user from the machine's PostgreSQL install.
#
#   scripts/replica.sh up     primary :5440, standby :5441, lagging standby :5442
#   scripts/replica.sh down   stops all three and removes $REPLICA_DIR
#   scripts/replica.sh urls   the three server URLs, one a line
#
# The lagging standby applies each commit $REPLICA_DELAY after the primary
# made it (recovery_min_apply_delay): a replica under load, made repeatable.
set -euo pipefail

REPLICA_DIR=${REPLICA_DIR:-/tmp/product-gateway-replica}
REPLICA_DELAY=${REPLICA_DELAY:-2s}
WAIT_SECS=${REPLICA_WAIT_SECS:-60}
NAMES=(primary standby lagging)

log() { echo "replica: $*" >&2; }
die() { log "$*"; exit 1; }

port() { case $1 in primary) echo 5440 ;; standby) echo 5441 ;; lagging) echo 5442 ;; esac; }
url() { echo "postgres://postgres@127.0.0.1:$(port "$1")"; }

bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [[ -x "$dir/$1" ]] || die "$1 not found under /usr/lib/postgresql (scripts/services.sh installs PostgreSQL)"
    echo "$dir/$1"
}

# PostgreSQL refuses to run as root: its servers run as postgres.
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

running() { as_pg "$(bin pg_ctl)" -D "$REPLICA_DIR/$1" status >/dev/null 2>&1; }

start() {
    as_pg "$(bin pg_ctl)" -D "$REPLICA_DIR/$1" -l "$REPLICA_DIR/$1.log" -w -t "$WAIT_SECS" start >/dev/null \
        || { tail -20 "$REPLICA_DIR/$1.log" >&2; die "$1 did not start"; }
}

init_primary() {
    local dir="$REPLICA_DIR/primary"
    as_pg "$(bin initdb)" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$dir/postgresql.conf" <<EOF
port = $(port primary)
listen_addresses = '127.0.0.1'
unix_socket_directories = '$REPLICA_DIR'
max_connections = 300
shared_buffers = 64MB
wal_level = replica
max_wal_senders = 10
# Tests, not durability: the servers are thrown away after every run.
fsync = off
full_page_writes = off
EOF
    echo "host replication all 127.0.0.1/32 trust" >>"$dir/pg_hba.conf"
}

init_standby() {
    local name=$1 dir="$REPLICA_DIR/$1"
    as_pg "$(bin pg_basebackup)" -h 127.0.0.1 -p "$(port primary)" -U postgres -D "$dir" -R -X stream -c fast
    cat >>"$dir/postgresql.conf" <<EOF
port = $(port "$name")
hot_standby = on
# Long snapshot reads are not cancelled by the primary's vacuum.
hot_standby_feedback = on
EOF
    if [[ $name == lagging ]]; then
        echo "recovery_min_apply_delay = '$REPLICA_DELAY'" >>"$dir/postgresql.conf"
    fi
}

up() {
    mkdir -p "$REPLICA_DIR"
    chown postgres "$REPLICA_DIR" 2>/dev/null || true
    chmod 700 "$REPLICA_DIR"
    local name
    for name in "${NAMES[@]}"; do
        if running "$name"; then continue; fi
        if [[ ! -f "$REPLICA_DIR/$name/PG_VERSION" ]]; then
            if [[ $name == primary ]]; then init_primary; else init_standby "$name"; fi
        fi
        start "$name"
        log "$name on $(url "$name")"
    done
}

down() {
    local name
    for name in "${NAMES[@]}"; do
        if running "$name"; then as_pg "$(bin pg_ctl)" -D "$REPLICA_DIR/$name" -m immediate stop >/dev/null; fi
    done
    rm -rf "$REPLICA_DIR"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    urls) for n in "${NAMES[@]}"; do url "$n"; done ;;
    *) die "usage: $0 up|down|urls" ;;
esac
