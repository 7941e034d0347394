//! What Stowage's binaries share beyond the API types (`stowage-api`), so that each has one
//! definition:
//!
//! - [`backend`]: a `backend` block resolved into the agent's `Repository` message (Secrets read
//!   only when labelled as credentials), with [`endpoints`], the administrator's allow-list;
//! - [`finding`]: what a check found, as a condition's reason and message;
//! - [`repository`]: what a `Repository` message of the agent protocol means, and its location;
//! - [`names`]: object names and label values bounded to Kubernetes' limits, with [`hash`];
//! - [`kube_errors`]: Kubernetes API errors as sentences;
//! - [`runtime`]: TLS files, shutdown signals, the metrics endpoint and logging;
//! - [`tls_files`]: TLS files that change under a running process (certificate renewal);
//! - [`shares`]: fair per-namespace shares of a bounded resource.

pub mod backend;
pub mod endpoints;
pub mod finding;
pub mod hash;
pub mod kube_errors;
pub mod names;
pub mod repository;
pub mod runtime;
pub mod shares;
pub mod tls_files;
