//! Stowage's API: the custom resources of group `stowage.dev` (version `v1alpha1`), their status
//! types, and the contract of labels, annotations and restic tags that the coordinator, the agents,
//! the plugin and users' manifests share. Types only: no Kubernetes client, no runtime, so whatever
//! reads or writes these objects (the plugin, the tests, other tools) depends on this alone.
//!
//! The Rust types are the source of truth: `crdgen` renders them into the chart
//! ([`render`]), and a test fails when the checked-in YAML drifts.
//!
//! - [`backend`]: where a repository lives and which Secrets open it;
//! - [`schedule`]: `Schedule`, and the settings its actions share with runs;
//! - [`runs`]: `Backup`, `Check`, `Prune`, `Restore`, `Verify`, `PreBackupPod`;
//! - [`status`]: what runs report;
//! - [`contract`]: label, annotation and tag names.

pub mod backend;
pub mod contract;
pub mod render;
pub mod runs;
pub mod schedule;
pub mod status;

pub use backend::*;
pub use runs::*;
pub use schedule::*;
pub use status::*;
