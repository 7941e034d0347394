# Shared settings of the local control plane scripts. Sourced, not run.
# shellcheck shell=bash

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLUSTER_DIR=${STOWAGE_CLUSTER_DIR:-$repo_root/target/cluster}
mkdir -p "$CLUSTER_DIR"
CLUSTER_DIR=$(cd "$CLUSTER_DIR" && pwd)
# Every listener is on loopback; the base port moves the whole set (two clusters can coexist).
PORT_BASE=${STOWAGE_CLUSTER_PORT_BASE:-16400}
APISERVER_PORT=$((PORT_BASE + 43))
ETCD_PORT=$((PORT_BASE + 79))
ETCD_PEER_PORT=$((PORT_BASE + 80))
KWOK_PORT=$((PORT_BASE + 50))
KCM_PORT=$((PORT_BASE + 57))
SCHED_PORT=$((PORT_BASE + 59))
# Stowage's agents listen on each node's address; the coordinator's metrics on 127.0.0.1.
AGENT_GRPC_PORT=$((PORT_BASE + 91))
AGENT_METRICS_PORT=$((PORT_BASE + 92))
COORDINATOR_METRICS_PORT=$((PORT_BASE + 93))
PKI="$CLUSTER_DIR/pki"
LOGS="$CLUSTER_DIR/logs"
PIDS="$CLUSTER_DIR/pids"

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

# Node k's InternalIP: 127.0.0.(10+k), so hostNetwork pods on a node get a distinct loopback address.
node_ip() { echo "127.0.0.$((10 + $1))"; }

pid_alive() { [ -f "$PIDS/$1" ] && kill -0 "$(cat "$PIDS/$1")" 2>/dev/null; }
