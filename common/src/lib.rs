//! What both Stowage binaries share, so that each contract has one definition:
//!
//! - [`contract`]: the label, annotation and snapshot-tag keys, and a repository's location;
//! - [`names`]: object names and label values bounded to Kubernetes' limits, with [`hash`];
//! - [`kube_errors`]: Kubernetes API errors as sentences;
//! - [`runtime`]: TLS files, shutdown signals, the metrics endpoint and logging;
//! - [`tls_files`]: TLS files that change under a running process (certificate renewal);
//! - [`shares`]: fair per-namespace shares of a bounded resource.

pub mod contract;
pub mod hash;
pub mod kube_errors;
pub mod names;
pub mod runtime;
pub mod shares;
pub mod tls_files;
