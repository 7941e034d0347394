//! The Stowage node agent.
//!
//! One agent runs on every node (a DaemonSet). It reads the volumes of the pods on its node straight
//! from the kubelet's directory, so backing up a ReadWriteOnce volume needs no extra pod and no
//! Multi-Attach, and it runs restic locally when the coordinator asks over mutually-authenticated gRPC.
//!
//! Modules, one concern each:
//! - [`config`]: flags and environment;
//! - [`inventory`]: which volumes this node has, kept current with inotify and mountinfo;
//! - [`limiter`]: the per-node bounds on restic processes (count and memory budget);
//! - [`memory`]: restic's estimated peak memory per operation, from the repository's index size;
//! - [`backup`] / [`restore`]: the operations, driving restic-wrap;
//! - [`exec`], [`command`], [`hook`]: commands in pods on this node (exec API): a command's stdout
//!   streamed into restic, and pre/post-backup hooks;
//! - [`cache`]: restic's caches on the node, expired by age and size;
//! - [`known_snapshots`]: snapshots already listed, so a restore's ownership check need not list again;
//! - [`maintenance`] / [`inspect`]: check and prune; reading locks and figures;
//! - [`safe_fs`]: symlink-safe path resolution and the staging merge used by restores;
//! - [`service`]: the gRPC service and its error codes;
//! - [`metrics`]: the Prometheus registry and HTTP endpoint;
//! - [`tls_listener`]: the gRPC listener's mutual TLS, re-read when its files change;
//! - [`server`]: wiring, health, reflection and graceful shutdown.

pub mod authz;
pub mod backup;
pub mod cache;
pub mod command;
pub mod config;
pub mod context;
pub mod error;
pub mod exec;
pub mod follow;
pub mod hook;
pub mod identity;
pub mod inspect;
pub mod inventory;
pub mod keys;
pub mod known_snapshots;
pub mod limiter;
pub mod maintenance;
pub mod memory;
pub mod metrics;
pub mod mountpoint;
pub mod preview;
pub mod repository;
pub mod restore;
pub mod restore_command;
pub mod safe_fs;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod staging;
pub mod tls_listener;
pub mod verify;
pub mod verify_sample;
pub mod verify_scratch;
