#!/usr/bin/env bash
# The test runs of the Makefile, with cargo-nextest when it is installed
# (profile ci: a JUnit report under target/nextest/ci), else cargo test.
# Every test runs even after a failure; the exit status says whether any
# failed. The services must answer already (`make services`).
#
#   all      every test; those that stop and restart the shared services
#            (tests/service_restarts) alone, afterwards; a replicated
#            PostgreSQL of their own for the read-replica tests
#            (scripts/replica.sh), taken down again
#   cluster  the cluster fault run (tests/cluster) on three RabbitMQ nodes
#            this script starts (scripts/cluster.sh) and takes down again
#   partitions short|full
#            the network fault run (tests/partitions): the lab of
#            scripts/netlab.sh built, the run on its client host, the lab
#            taken down again; short is a gateway cut and a broker partition,
#            full every fault
#
# Usage: scripts/test.sh all|cluster|partitions short|full
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO=${CARGO:-cargo}
RESTART_TEST=service_restarts
CLUSTER_TEST=cluster
PARTITIONS_TEST=partitions
# The harness's broker for the cluster run: node c1 of scripts/cluster.sh.
CLUSTER_AMQP=amqp://guest:guest@127.0.0.1:5701
CLUSTER_API=http://127.0.0.1:15701

rc=0
# Runs a command, echoed first; a failure is remembered, not fatal.
run() {
    echo "+ $*"
    "$@" || rc=$?
}

nextest() { "$CARGO" nextest --version >/dev/null 2>&1; }

# One binary, its tests one at a time.
alone() { # test-binary
    if nextest; then
        run "$CARGO" nextest run --profile ci --test "$1" --test-threads 1
    else
        run "$CARGO" test --test "$1" -- --test-threads=1
    fi
}

all() {
    # The read-replica tests' primary and standbys (tests/api/replica.rs).
    run scripts/replica.sh up
    if nextest; then
        run "$CARGO" nextest run --workspace --no-fail-fast --profile ci \
            -E "not binary($RESTART_TEST) and not binary($CLUSTER_TEST) and not binary($PARTITIONS_TEST)"
    else
        # Integration test binaries are tests/*.rs and tests/*/main.rs.
        local selection=(--lib --bins) t
        for t in tests/*.rs tests/*/main.rs; do
            [[ -e "$t" ]] || continue
            t=${t#tests/}
            t=${t%.rs}
            t=${t%/main}
            [[ "$t" == "$RESTART_TEST" || "$t" == "$CLUSTER_TEST" || "$t" == "$PARTITIONS_TEST" ]] ||
                selection+=(--test "$t")
        done
        run "$CARGO" test --no-fail-fast "${selection[@]}"
    fi
    scripts/replica.sh down
    alone "$RESTART_TEST"
}

cluster() {
    if run scripts/cluster.sh nodes; then
        GATEWAY_TEST_AMQP=$CLUSTER_AMQP GATEWAY_TEST_RABBIT_API=$CLUSTER_API alone "$CLUSTER_TEST"
    fi
    scripts/cluster.sh down
}

# The lab's services as the harness reaches them from the lab's client host.
LAB_ENV=(
    GATEWAY_TEST_PG=postgres://postgres@10.231.0.21:5432
    GATEWAY_TEST_AMQP=amqp://guest:guest@10.231.0.11:5672
    GATEWAY_TEST_RABBIT_API=http://10.231.0.11:15672
    GATEWAY_TEST_REDIS=redis://10.231.0.23:6379
)

partitions() { # short|full
    local which=()
    case "${1:-}" in
    short) ;;
    full) which=(--run-ignored only) ;;
    *) echo "partitions short|full" >&2; return 2 ;;
    esac
    # Built here: the lab's hosts reach nothing outside the lab.
    run "$CARGO" test --no-run --test "$PARTITIONS_TEST"
    if run scripts/netlab.sh up; then
        if nextest; then
            run scripts/netlab.sh run c env "${LAB_ENV[@]}" "$CARGO" nextest run --offline --profile ci \
                --test "$PARTITIONS_TEST" --no-capture "${which[@]}"
        else
            local ignored=()
            [[ "$1" == full ]] && ignored=(--ignored)
            run scripts/netlab.sh run c env "${LAB_ENV[@]}" "$CARGO" test --offline --test "$PARTITIONS_TEST" \
                -- --test-threads=1 --nocapture "${ignored[@]}"
        fi
    fi
    scripts/netlab.sh down
}

case "${1:-}" in
all) all ;;
cluster) cluster ;;
partitions) partitions "${2:-}" ;;
*)
    sed -n '2,19s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
    ;;
esac
exit "$rc"
