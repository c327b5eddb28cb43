#!/usr/bin/env bash
# A PostgreSQL primary with streaming standbys, beside the machine's own
# PostgreSQL: what snapshots served from a read replica are tested against.
# The servers run as the postgres user from the machine's PostgreSQL install.
#
#   scripts/replica.sh up     on loopback, under $REPLICA_DIR: primary :5440,
#                             standby :5441, lagging standby :5442
#   scripts/replica.sh down   stops those three and removes $REPLICA_DIR
#   scripts/replica.sh urls   their server URLs, one a line
#
# One server at a time, for hosts of their own (scripts/netlab.sh runs these
# inside a network namespace each); NET is who may connect (CIDR):
#
#   scripts/replica.sh primary DIR ADDRESS PORT NET
#   scripts/replica.sh standby DIR ADDRESS PORT NET PRIMARY_ADDRESS PRIMARY_PORT [DELAY]
#   scripts/replica.sh stop DIR
#   scripts/replica.sh delay DIR DELAY   a running standby applies commits DELAY late
#
# A standby with DELAY applies each commit that long after the primary made
# it (recovery_min_apply_delay): a replica under load, made repeatable.
set -euo pipefail

REPLICA_DIR=${REPLICA_DIR:-/tmp/product-gateway-replica}
REPLICA_DELAY=${REPLICA_DELAY:-2s}
WAIT_SECS=${REPLICA_WAIT_SECS:-60}
LOOPBACK=(primary:5440 standby:5441 lagging:5442)

log() { echo "replica: $*" >&2; }
die() { log "$*"; exit 1; }

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

running() { [[ -f "$1/PG_VERSION" ]] && as_pg "$(bin pg_ctl)" -D "$1" status >/dev/null 2>&1; }

# A directory the servers' data and sockets live in, the postgres user's.
own_dir() {
    mkdir -p "$1"
    chown postgres "$1" 2>/dev/null || true
    chmod 700 "$1"
}

start() { # DIR
    as_pg "$(bin pg_ctl)" -D "$1" -l "$1.log" -w -t "$WAIT_SECS" start >/dev/null \
        || { tail -20 "$1.log" >&2; die "the server in $1 did not start"; }
}

primary() { # DIR ADDRESS PORT NET
    local dir=$1 address=$2 port=$3 net=$4
    if running "$dir"; then return 0; fi
    own_dir "$(dirname "$dir")"
    if [[ ! -f "$dir/PG_VERSION" ]]; then
        as_pg "$(bin initdb)" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
        cat >>"$dir/postgresql.conf" <<EOF
port = $port
listen_addresses = '$address'
unix_socket_directories = '$(dirname "$dir")'
max_connections = 300
shared_buffers = 64MB
wal_level = replica
max_wal_senders = 10
# Tests, not durability: these servers are thrown away after every run.
fsync = off
full_page_writes = off
EOF
        printf 'host all all %s trust\nhost replication all %s trust\n' "$net" "$net" >>"$dir/pg_hba.conf"
    fi
    start "$dir"
    log "primary on postgres://postgres@$address:$port"
}

standby() { # DIR ADDRESS PORT NET PRIMARY_ADDRESS PRIMARY_PORT [DELAY]
    local dir=$1 address=$2 port=$3 net=$4 from=$5 from_port=$6 delay=${7:-}
    if running "$dir"; then return 0; fi
    own_dir "$(dirname "$dir")"
    if [[ ! -f "$dir/PG_VERSION" ]]; then
        as_pg "$(bin pg_basebackup)" -h "$from" -p "$from_port" -U postgres -D "$dir" -R -X stream -c fast
        cat >>"$dir/postgresql.conf" <<EOF
port = $port
listen_addresses = '$address'
unix_socket_directories = '$(dirname "$dir")'
hot_standby = on
# Long snapshot reads are not cancelled by the primary's vacuum.
hot_standby_feedback = on
EOF
        [[ -z "$delay" ]] || echo "recovery_min_apply_delay = '$delay'" >>"$dir/postgresql.conf"
        # The copy carries the primary's pg_hba.conf; NET may differ.
        printf 'host all all %s trust\n' "$net" >>"$dir/pg_hba.conf"
    fi
    start "$dir"
    log "standby${delay:+ (applies $delay late)} on postgres://postgres@$address:$port"
}

delay() { # DIR DELAY: a running standby's apply delay, changed in place
    local conf="$1/postgresql.auto.conf"
    [[ -f "$conf" ]] || die "no server in $1"
    sed -i '/^recovery_min_apply_delay/d' "$conf"
    echo "recovery_min_apply_delay = '$2'" >>"$conf"
    as_pg "$(bin pg_ctl)" -D "$1" reload >/dev/null
}

stop() { # DIR
    if running "$1"; then as_pg "$(bin pg_ctl)" -D "$1" -m immediate stop >/dev/null; fi
}

up() {
    own_dir "$REPLICA_DIR"
    primary "$REPLICA_DIR/primary" 127.0.0.1 5440 127.0.0.1/32
    standby "$REPLICA_DIR/standby" 127.0.0.1 5441 127.0.0.1/32 127.0.0.1 5440
    standby "$REPLICA_DIR/lagging" 127.0.0.1 5442 127.0.0.1/32 127.0.0.1 5440 "$REPLICA_DELAY"
}

down() {
    local s
    for s in "${LOOPBACK[@]}"; do stop "$REPLICA_DIR/${s%%:*}"; done
    rm -rf "$REPLICA_DIR"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    urls) for s in "${LOOPBACK[@]}"; do echo "postgres://postgres@127.0.0.1:${s##*:}"; done ;;
    primary) primary "${@:2}" ;;
    standby) standby "${@:2}" ;;
    stop) stop "$2" ;;
    delay) delay "$2" "$3" ;;
    *) die "usage: $0 up|down|urls, or primary|standby|stop (see the script's head)" ;;
esac
