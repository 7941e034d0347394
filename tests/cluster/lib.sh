# Shared settings of the local control plane scripts. Sourced, not run.
# shellcheck shell=bash

# Cargo as a user's shell runs it. `cargo test` runs these scripts with the test's CARGO,
# CARGO_MANIFEST_DIR, CARGO_PKG_* and CARGO_BIN_EXE_* set; build scripts that watch such variables
# (ring's) would make every build here rebuild, and the next build from a shell rebuild again.
cargo() {
  local keep=() v
  for v in PATH HOME TMPDIR TERM CARGO_HOME CARGO_TARGET_DIR CARGO_INCREMENTAL RUSTUP_HOME RUSTUP_TOOLCHAIN RUSTFLAGS; do
    if [ -n "${!v:-}" ]; then keep+=("$v=${!v}"); fi
  done
  env -i "${keep[@]}" cargo "$@"
}
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

# A key and a certificate signed by the cluster CA in $PKI: name CN O(rganisation) subjectAltNames.
gen_cert() { # name CN O sans
  local name=$1 cn=$2 org=$3 sans=$4
  [ -f "$PKI/$name.crt" ] && return 0
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  local subj="/CN=$cn"; [ -n "$org" ] && subj="/O=$org/CN=$cn"
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  local ext="$PKI/$name.ext"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [ -n "$sans" ] && echo "subjectAltName=$sans"
  } > "$ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
}

# A process of the cluster, in its own session (so `down` stops its whole group), logged to $LOGS.
start() { # name cmd...
  local name=$1; shift
  if pid_alive "$name"; then return 0; fi
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$name"
}
wait_for() { # what seconds cmd...
  local what=$1 secs=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "$what not ready after ${secs}s (logs in $LOGS)"
    sleep 0.2
  done
}
