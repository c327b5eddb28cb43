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
#
# Usage: scripts/test.sh all|cluster
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO=${CARGO:-cargo}
RESTART_TEST=service_restarts
CLUSTER_TEST=cluster
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
            -E "not binary($RESTART_TEST) and not binary($CLUSTER_TEST)"
    else
        # Integration test binaries are tests/*.rs and tests/*/main.rs.
        local selection=(--lib --bins) t
        for t in tests/*.rs tests/*/main.rs; do
            [[ -e "$t" ]] || continue
            t=${t#tests/}
            t=${t%.rs}
            t=${t%/main}
            [[ "$t" == "$RESTART_TEST" || "$t" == "$CLUSTER_TEST" ]] || selection+=(--test "$t")
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

case "${1:-}" in
all) all ;;
cluster) cluster ;;
*)
    sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
    ;;
esac
exit "$rc"
