//! The Stowage coordinator: turns `Schedule`, `Backup`, `Check` and `Prune` objects into work for the
//! node agents.
//!
//! Built so far (the controller loop, dispatch and status writing come next):
//! - [`crd`]: the custom resource types; `crdgen` writes their YAML into the Helm chart;
//! - [`cron`]: schedule expressions, including `-random` variants that are stable per schedule;
//! - [`plan`]: the pure planning of a backup run (which volume is read by which node's agent).

pub mod crd;
pub mod cron;
pub mod plan;
