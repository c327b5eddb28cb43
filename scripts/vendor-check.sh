#!/usr/bin/env bash
# Checks that each crate under vendor/ is the published crate plus its one
# diff, and nothing else: cargo fetches the published crate into a scratch
# project, the diff is applied to a copy, and the two trees must be equal.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# crate, version, diff
check() {
    local crate=$1 version=$2 diff=$3
    mkdir -p "$scratch/$crate/probe/src"
    cat >"$scratch/$crate/probe/Cargo.toml" <<TOML
[package]
name = "vendor-probe"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
$crate = "=$version"
TOML
    : >"$scratch/$crate/probe/src/lib.rs"
    cargo fetch --quiet --manifest-path "$scratch/$crate/probe/Cargo.toml"

    local published
    published=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -mindepth 2 -maxdepth 2 -type d -name "$crate-$version" | head -n 1)
    if [[ -z $published ]]; then
        echo "vendor-check: cargo fetched no $crate $version" >&2
        exit 1
    fi
    cp -r "$published" "$scratch/$crate/expected"
    patch --quiet -p1 -d "$scratch/$crate/expected" <"$diff"
    if ! diff -r "$scratch/$crate/expected" "vendor/$crate"; then
        echo "vendor-check: vendor/$crate differs from $crate $version plus $diff" >&2
        exit 1
    fi
    echo "vendor-check: vendor/$crate is $crate $version plus its one patch"
}

check actix-http 3.19.0 vendor/actix-http-idle-buffers.diff
