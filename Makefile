# product-gateway: everyday commands. `make help` lists them.
#
# Services (PostgreSQL, Redis, RabbitMQ) come from scripts/services.sh: the
# ones already answering on their default local ports are used, missing ones
# are started with Docker compose when a Docker engine answers, else locally.
# Tools come from scripts/tools.sh, test runs from scripts/test.sh.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO    ?= cargo
SERVICES := scripts/services.sh

# Port the service listens on; config/default.toml is overridden by the same
# environment variable the service reads.
GATEWAY__SERVER__PORT ?= 8080
PORT := $(GATEWAY__SERVER__PORT)
# The ingest API's token for `make run` (dev mode accepts a short one).
INGEST_TOKEN ?= dev-ingest-token

# Where the tests find the services; the environment or the command line
# overrides each.
export GATEWAY_TEST_PG         ?= postgres://postgres@127.0.0.1:5432
export GATEWAY_TEST_AMQP       ?= amqp://guest:guest@127.0.0.1:5672
export GATEWAY_TEST_RABBIT_API ?= http://127.0.0.1:15672
export GATEWAY_TEST_REDIS      ?= redis://127.0.0.1:6379
# Quiet tests; `make run` keeps the service's own log level.
test: export RUST_LOG ?= warn

# The cluster fault run's broker: node c1 of scripts/cluster.sh.
CLUSTER_TEST  := cluster
CLUSTER_ENV   := GATEWAY_TEST_AMQP=amqp://guest:guest@127.0.0.1:5701 GATEWAY_TEST_RABBIT_API=http://127.0.0.1:15701

.PHONY: help services definitions build run test test-cluster test-partitions partitions lint deny bench chaos cluster cluster-stop cluster-chaos fmt clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

services: ## start whatever of PostgreSQL, Redis, RabbitMQ is missing
	$(SERVICES) ensure

definitions: services ## load rabbit/definitions.json through the management API
	$(SERVICES) definitions

build: ## release build
	$(CARGO) build --release

run: services definitions ## services, seed, then serve (prints the URLs)
	$(CARGO) run --release --bin product-gateway -- seed
	@echo
	@echo "  service         http://127.0.0.1:$(PORT)/   (REST /products, SSE /events, WebSocket /ws)"
	@echo "  echo page       http://127.0.0.1:$(PORT)/"
	@echo "  management UI   http://127.0.0.1:15672/   (login guest / guest)"
	@echo
	@echo "  admin dev mode ON (GATEWAY__ADMIN__DEV_MODE=true): the default admin token is accepted; local use only"
	@echo "  ingest token    $(INGEST_TOKEN)   (POST /products/{id}/price and /stock)"
	@echo
	GATEWAY__ADMIN__DEV_MODE=true GATEWAY__INGEST__TOKEN=$(INGEST_TOKEN) $(CARGO) run --release --bin product-gateway -- serve

test: services ## every test; service-restart tests alone, afterwards
	scripts/tools.sh chromium
	scripts/tools.sh checkers
	CARGO=$(CARGO) scripts/test.sh all

lint: ## rustfmt check, clippy (warnings are errors), and dependencies in pipeline order
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	scripts/layers.sh

# scripts/bench-tools.sh installs wrk and nginx (and perf) from Debian when
# missing; the bench starts nginx on a free loopback port, and may restart an
# idle local RabbitMQ to raise its open-files limit (scripts/bench-rabbit.sh).
# BENCH_ONLY=2,5 runs some scenarios only (BENCHMARKS.md is then left alone).
bench: services ## load benchmark, every scenario (< 31 min); table into BENCHMARKS.md
	scripts/bench-tools.sh
	$(CARGO) build --release -p bench
	BENCH_COMMAND="make bench" target/release/bench

chaos: services ## five-minute fault run (tests/service_restarts, harness testkit::chaos); prints lost = 0 and recovery times
	$(CARGO) test --release --test service_restarts -- --ignored --nocapture full_chaos_run_loses_nothing

test-cluster: services ## cluster fault run (tests/cluster): three RabbitMQ nodes started, a node killed under load, nodes taken down
	CARGO=$(CARGO) scripts/test.sh cluster

test-partitions: services ## network fault run, short (tests/partitions): the lab of scripts/netlab.sh, a gateway cut from two broker nodes and a broker partition, under load
	CARGO=$(CARGO) scripts/test.sh partitions short

partitions: services ## every network fault in the lab (about eight minutes); prints lost = 0, double-applied = 0, client gaps and recovery times
	CARGO=$(CARGO) scripts/test.sh partitions full

cluster: services ## three RabbitMQ nodes, three gateways behind HAProxy on :8090; prints every URL
	$(CARGO) build --release --bin product-gateway
	scripts/cluster.sh up

cluster-stop: ## stops what `make cluster` started
	scripts/cluster.sh down

cluster-chaos: services ## five-minute fault run on the cluster; prints lost = 0, client gaps and recovery times
	@rc=0; \
	scripts/cluster.sh nodes || rc=$$?; \
	if [ $$rc = 0 ]; then \
		$(CLUSTER_ENV) $(CARGO) test --release --test $(CLUSTER_TEST) -- --ignored --nocapture full_cluster_chaos_run_loses_nothing || rc=$$?; \
	fi; \
	scripts/cluster.sh down; \
	exit $$rc

deny: ## licences, bans and sources of every dependency (cargo-deny, installed when missing); the vendored crate is the published one plus its diff
	@command -v cargo-deny >/dev/null 2>&1 || $(CARGO) install cargo-deny --locked
	$(CARGO) deny check licenses bans sources
	scripts/vendor-check.sh

fmt: ## format the code
	$(CARGO) fmt --all

clean: ## remove build output
	$(CARGO) clean
