#!/usr/bin/env bash
# Tools the benchmark drives besides the project's own services:
#   wrk    the HTTP load generator of the photo scenario
#   nginx  the static-file baseline of the photo scenario (started by the
#          bench on a free loopback port with a config in a temporary folder)
#   perf   optional: CPU profiles of the scenarios (linux-perf)
#
# Installed from Debian's packages when missing (as root). Installing nginx
# must not leave Debian's default site running on port 80: a policy-rc.d that
# forbids service starts is put in place for the install only, when none is
# there already.
set -euo pipefail

log() { printf 'bench-tools: %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

missing=()
have wrk || missing+=(wrk)
have nginx || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
have perf || missing+=(linux-perf)

if ((${#missing[@]} == 0)); then
    log "wrk, nginx and perf are installed"
    exit 0
fi
if [[ "$(id -u)" != 0 ]] || ! have apt-get; then
    log "missing: ${missing[*]}; install them (Debian: apt-get install ${missing[*]})"
    # perf is optional; wrk and nginx are not.
    for m in "${missing[@]}"; do [[ "$m" == linux-perf ]] || exit 1; done
    exit 0
fi

policy=/usr/sbin/policy-rc.d
placed=no
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# placed by product-gateway scripts/bench-tools.sh during an install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    placed=yes
fi
cleanup() { if [[ "$placed" == yes ]]; then rm -f "$policy"; fi; }
trap cleanup EXIT

log "apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
    log "install failed; refreshing the package lists once"
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
have wrk || { log "wrk is still missing"; exit 1; }
have nginx || [[ -x /usr/sbin/nginx ]] || { log "nginx is still missing"; exit 1; }
log "installed ${missing[*]}"
