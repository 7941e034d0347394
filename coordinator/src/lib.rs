//! The Stowage coordinator: turns `Schedule`, `Backup`, `Check` and `Prune` objects into work for the
//! node agents.
//!
//! - [`crd`]: the custom resource types; `crdgen` writes their YAML into the Helm chart;
//! - [`cron`] and [`firing`]: schedule expressions (stable `-random` variants) and when one is due;
//! - [`schedule`]: the Schedule reconciler (validation, firing, overlap, history);
//! - [`restic_fields`]: checks of the spec fields that reach restic's command line;
//! - [`plan`]: the pure planning of a backup run (which volume is read by which node's agent);
//! - [`run`]: executing Backup, Check and Prune runs; [`dispatch`] calls the agents;
//! - [`agents`]: finding agent pods and dialling them with mutual TLS;
//! - [`mount_holder`]: pods that mount otherwise unmounted PVCs so they can be read;
//! - [`leader`]: Lease-based leader election; [`controller`]: the wiring.

pub mod agents;
pub mod backend;
pub mod conditions;
pub mod config;
pub mod context;
pub mod controller;
pub mod crd;
pub mod cron;
pub mod dispatch;
pub mod firing;
pub mod leader;
pub mod metrics;
pub mod mount_holder;
pub mod plan;
pub mod restic_fields;
pub mod run;
pub mod runs;
pub mod schedule;
pub mod telemetry;
