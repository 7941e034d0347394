//! A typed async wrapper around the `restic` binary (0.17 or newer).
//!
//! - Option structs render argv ([`options`]); call sites never assemble strings.
//! - Secrets travel only in the child's environment ([`Repository::env`]); argv and logs never carry them.
//! - Every `--json` message we read has a serde type ([`json`]) that tolerates unknown fields.
//! - Failures are classified ([`Error`]): missing repository, wrong password, lock held (with holder and
//!   age), partial backup, timeout, cancellation, or a command failure with its stderr tail.
//! - A running restic is owned ([`process::ResticProcess`]): dropping it kills its process group.
//! - On "already locked", [`lock::LockPolicy`] waits with backoff and removes locks whose holder is gone.

pub mod command;
pub mod error;
pub mod json;
pub mod lock;
pub mod options;
pub mod process;
pub mod repository;
pub mod restic;
pub mod sandbox;
pub mod stream;

pub use error::{Error, Result};
pub use lock::{LockInfo, LockObserver, LockPolicy};
pub use repository::{Backend, Repository};
pub use restic::Restic;
pub use sandbox::Sandbox;
pub use stream::{BackupEvent, BackupRun, Limits, LsRun, PreviewRun, RestoreRun};
