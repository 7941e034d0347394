//! The Stowage coordinator: turns `Schedule`, `Backup`, `Check` and `Prune` objects into work for the
//! node agents.
//!
//! Data flows top to bottom: Schedule → run (self-contained) → plan (from the watch caches) →
//! volume tasks → agent → one status writer per run.
//!
//! - the custom resource types are `stowage-api`'s (with `crdgen`, which writes them into the chart);
//! - [`cron`] and [`firing`]: schedule expressions (stable `-random` variants) and when one is due;
//! - [`schedule`]: the Schedule reconciler (validate, fire, next times and conditions, history);
//! - [`restic_fields`]: checks of the spec fields that reach restic as flags (the `backend` block
//!   is resolved by `stowage_common::backend`, which the plugin shares: credentials only from
//!   labelled Secrets, endpoints from the administrator's allow-list);
//! - [`state`]: the watch caches (PVCs and Pods as compact [`records`], Secrets by key name);
//! - [`plan`]: the pure planning of a backup run (which volume is read by which node's agent);
//! - [`run`]: executing Backup, Check and Prune runs (`run::volume` is one volume's task,
//!   `run::status` the run's one status writer); [`dispatch`] calls the agents;
//! - [`inspect`]: repository locks and figures between runs (gauges, Schedule status), with
//!   [`inspections`], what it shares with runs and the Schedule reconciler;
//! - [`agents`]: finding agent pods and dialling them with mutual TLS;
//! - [`mount_holder`]: pods that mount otherwise unmounted PVCs so they can be read;
//! - [`prebackup_pod`]: the helper pods of PreBackupPods, started and deleted around their command;
//!   [`prebackup_policy`]: what their templates may ask for;
//! - [`errors`]: errors as bounded sentences;
//! - [`leader`]: leader election; [`controller`]: the wiring.

pub mod agents;
pub mod apply;
pub mod conditions;
pub mod config;
pub mod context;
pub mod controller;
pub mod cron;
pub mod dispatch;
pub mod errors;
pub mod firing;
pub mod inspect;
pub mod inspections;
pub mod leader;
pub mod metrics;
pub mod mount_holder;
pub mod plan;
pub mod prebackup_pod;
pub mod prebackup_policy;
pub mod records;
pub mod restic_fields;
pub mod run;
pub mod runs;
pub mod schedule;
pub mod state;
