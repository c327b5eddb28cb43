#!/usr/bin/env bash
# Installs, when missing, the tools the tests and the cluster run use: a
# browser for the page tests, the contract checkers of `make test`, the
# load balancer of `make cluster`. Present ones are left alone.
#
# Usage: scripts/tools.sh chromium|checkers|haproxy
#
# Every action is logged, one line each, on stderr.
set -euo pipefail

SCRIPT_NAME=tools
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

chromium() {
    if [[ -x /usr/bin/chromium ]]; then
        log "chromium present (/usr/bin/chromium)"
    elif is_debian_root; then
        log "chromium missing: installing"
        apt_install chromium
    else
        die "chromium missing: install it (Debian: sudo apt-get install -y chromium)"
    fi

    if [[ ! -f tests/browser/package.json ]]; then
        log "tests/browser/package.json absent: skipping npm install"
    elif [[ -d tests/browser/node_modules/playwright-core && -d tests/browser/node_modules/@asyncapi/parser ]]; then
        log "playwright-core and @asyncapi/parser present in tests/browser/node_modules"
    else
        if ! have npm; then
            if is_debian_root; then
                apt_install npm
            else
                die "npm missing: install Node.js and npm"
            fi
        fi
        log "npm install --prefix tests/browser"
        npm install --prefix tests/browser --no-audit --no-fund >&2
    fi
}


# Contract checkers of `make test`, under target/tools: promtool, from
# Debian's prometheus package unpacked (only the linter is wanted, not the
# server the package would install and start), and schemathesis.
TOOLS_BIN="$ROOT/target/tools/bin"
SCHEMATHESIS_VERSION=4.32.5
checkers() {
    mkdir -p "$TOOLS_BIN"
    if [[ -x "$TOOLS_BIN/promtool" ]]; then
        log "promtool present ($TOOLS_BIN/promtool)"
    elif have promtool; then
        log "promtool present ($(command -v promtool))"
        ln -sf "$(command -v promtool)" "$TOOLS_BIN/promtool"
    elif have apt-get && have dpkg-deb; then
        log "promtool missing: unpacking it from Debian's prometheus package"
        local tmp
        tmp=$(mktemp -d)
        if ! (cd "$tmp" && apt-get download prometheus >&2 2>/dev/null); then
            apt-get update -qq >&2
            (cd "$tmp" && apt-get download prometheus >&2)
        fi
        dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
        cp "$tmp/x/usr/bin/promtool" "$TOOLS_BIN/promtool"
        rm -rf "$tmp"
    else
        die "promtool missing: install Prometheus's promtool (Debian: apt-get install prometheus)"
    fi
    # schemathesis, from PyPI, pinned, in a virtualenv of its own.
    local venv="$ROOT/target/tools/venv"
    if [[ -x "$venv/bin/schemathesis" ]] && "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
        log "schemathesis $SCHEMATHESIS_VERSION present ($venv)"
    else
        have python3 || die "python3 missing: needed for schemathesis"
        log "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
        python3 -m venv "$venv" >&2
        "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" >&2
    fi
}

# HAProxy, the load balancer of `make cluster`.
haproxy_installed() {
    have haproxy && return 0
    is_debian_root || die "haproxy missing: install it (Debian: sudo apt-get install -y haproxy)"
    apt_install haproxy
}

usage() {
    cat >&2 <<EOF
usage: $0 <command>
  chromium     chromium, and tests/browser's npm packages (playwright-core,
               @asyncapi/parser)
  checkers     contract checkers of make test into target/tools: promtool
               (from Debian's prometheus package), schemathesis (PyPI)
  haproxy      HAProxy (the load balancer of make cluster)
EOF
}

case "${1:-}" in
chromium) chromium ;;
checkers) checkers ;;
haproxy) haproxy_installed ;;
-h | --help | help) usage ;;
*)
    usage
    exit 2
    ;;
esac
