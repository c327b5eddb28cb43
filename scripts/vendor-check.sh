#!/usr/bin/env bash
# Checks that vendor/actix-http is the published actix-http 3.19.0 plus
# vendor/actix-http-idle-buffers.diff, and nothing else: cargo fetches the
# published crate into a scratch project, the diff is applied to a copy, and
# the two trees must be equal.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

version=3.19.0
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

mkdir -p "$scratch/probe/src"
cat >"$scratch/probe/Cargo.toml" <<TOML
[package]
name = "vendor-probe"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
actix-http = "=$version"
TOML
: >"$scratch/probe/src/lib.rs"
cargo fetch --quiet --manifest-path "$scratch/probe/Cargo.toml"

published=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -mindepth 2 -maxdepth 2 -type d -name "actix-http-$version" | head -n 1)
if [[ -z $published ]]; then
    echo "vendor-check: cargo fetched no actix-http $version" >&2
    exit 1
fi
cp -r "$published" "$scratch/expected"
patch --quiet -p1 -d "$scratch/expected" <vendor/actix-http-idle-buffers.diff
if ! diff -r "$scratch/expected" vendor/actix-http; then
    echo "vendor-check: vendor/actix-http differs from actix-http $version plus vendor/actix-http-idle-buffers.diff" >&2
    exit 1
fi
echo "vendor-check: vendor/actix-http is actix-http $version plus its one patch"
