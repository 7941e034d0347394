//! restic failures, classified from its exit status and stderr so callers can act on them.

use std::path::PathBuf;
use std::time::Duration;

use crate::json::BackupSummary;
use crate::lock::LockInfo;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An item restic could not read during a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    /// As restic printed it (relative to the working directory for relative backups).
    pub item: String,
    pub during: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not start restic at {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("i/o with restic ({context}): {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("restic {found} is too old; at least {required} is needed")]
    UnsupportedVersion { found: String, required: String },
    #[error(
        "no restic repository at {location} (create it with `restic init`, or ask for auto-init)"
    )]
    RepositoryNotFound { location: String },
    #[error("wrong password for the repository at {location} (or no key matches it)")]
    WrongPassword { location: String },
    #[error("repository is locked: {lock}")]
    Locked { lock: Box<LockInfo> },
    #[error("nothing to back up: {message}")]
    SourceMissing { message: String },
    /// restic refuses to store a snapshot of an empty tree.
    #[error("nothing to back up: the source is empty (restic stores no empty snapshots)")]
    EmptySource,
    /// restic exit 3: a snapshot was written but some files could not be read. Not a success.
    #[error("backup is incomplete: {} item(s) could not be read (snapshot {})", errors.len(), summary.snapshot_id)]
    PartialBackup {
        summary: Box<BackupSummary>,
        errors: Vec<ItemError>,
    },
    #[error("restic {subcommand} failed (exit {status}): {stderr_tail}")]
    CommandFailed {
        subcommand: String,
        /// Exit code, or -signal when killed by a signal.
        status: i32,
        stderr_tail: String,
    },
    #[error("restic {subcommand} printed output we could not parse: {source}")]
    Json {
        subcommand: String,
        #[source]
        source: serde_json::Error,
    },
    /// The server refused to remove data: append-only credentials (rest-server `--append-only`, or
    /// a bucket policy that denies deletes) used for forget or prune.
    #[error(
        "restic {subcommand}: the repository refused to remove data (HTTP 403 Forbidden): these credentials are append-only, so they can add backups but never delete them; forget and prune need maintenance credentials that may delete (docs/hardening.md). restic said: {stderr_tail}"
    )]
    AppendOnly {
        subcommand: String,
        stderr_tail: String,
    },
    #[error("restic {subcommand} timed out after {} and was stopped", human(*after))]
    Timeout { subcommand: String, after: Duration },
    #[error("restic {subcommand} made no progress for {} and was stopped", human(*after))]
    Stalled { subcommand: String, after: Duration },
    #[error("restic {subcommand} was cancelled")]
    Cancelled { subcommand: String },
}

/// restic's documented exit codes (0.17 and later).
pub mod exit {
    pub const FATAL: i32 = 1;
    pub const PARTIAL: i32 = 3;
    pub const NO_REPOSITORY: i32 = 10;
    pub const LOCK_FAILED: i32 = 11;
    pub const WRONG_PASSWORD: i32 = 12;
    pub const INTERRUPTED: i32 = 130;
}

impl Error {
    /// Maps a non-zero exit to a variant. The cause comes from restic's exit code, never from its
    /// wording: only exit 10 means "no repository" (so only it may ever lead to `restic init`), and an
    /// authentication, permission or network error stays a plain failure. Text is read only to add
    /// detail (the lock holder) or to tell two fatal errors apart that need different handling.
    pub(crate) fn from_exit(subcommand: &str, status: i32, stderr: &str, location: &str) -> Error {
        match status {
            exit::NO_REPOSITORY => Error::RepositoryNotFound {
                location: location.to_string(),
            },
            exit::WRONG_PASSWORD => Error::WrongPassword {
                location: location.to_string(),
            },
            exit::LOCK_FAILED => Error::Locked {
                lock: Box::new(LockInfo::parse(stderr).unwrap_or_default()),
            },
            exit::INTERRUPTED => Error::Cancelled {
                subcommand: subcommand.to_string(),
            },
            exit::FATAL if stderr.contains("directories/files do not exist") => {
                Error::SourceMissing {
                    message: tail(stderr, 512),
                }
            }
            exit::FATAL if subcommand == "backup" && stderr.contains("snapshot is empty") => {
                Error::EmptySource
            }
            _ if refused_removal(stderr) => Error::AppendOnly {
                subcommand: subcommand.to_string(),
                stderr_tail: tail(stderr, 1024),
            },
            _ => Error::CommandFailed {
                subcommand: subcommand.to_string(),
                status,
                stderr_tail: tail(stderr, 2048),
            },
        }
    }
}

/// Whether restic's stderr says the backend refused to remove a file: rest-server's append-only
/// mode answers 403 to a DELETE (`Remove(<snapshot/...>) failed: unexpected HTTP response (403)`),
/// S3 with a policy that denies deletes `Access Denied`.
fn refused_removal(stderr: &str) -> bool {
    stderr.lines().any(|l| {
        l.contains("Remove(")
            && (l.contains("(403)") || l.contains("403 Forbidden") || l.contains("Access Denied"))
    })
}

/// "1h2m3s", "45s", "1.5s": durations in messages people read.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 10 && d.subsec_millis() != 0 {
        return format!("{:.1}s", d.as_secs_f64());
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m, s) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

/// The last `max` bytes of `s` (on a char boundary), trimmed.
pub(crate) fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/restic-samples");

    fn sample(name: &str) -> String {
        std::fs::read_to_string(format!("{SAMPLES}/{name}")).unwrap()
    }

    #[test]
    fn a_refused_removal_says_the_credentials_are_append_only() {
        // What restic 0.19.1 printed when `forget` met rest-server --append-only.
        let stderr = "Remove(<snapshot/bc27825628>) failed: unexpected HTTP response (403): 403 Forbidden\n\
            unable to remove snapshot/bc27825628012e0760a00049aff2d7519d3971459e6a519eca242febb67baf07 from the repository\n\
            failed to remove one or more snapshots\n";
        let e = Error::from_exit("forget", 3, stderr, "rest:http://127.0.0.1:1/shop/");
        assert!(matches!(e, Error::AppendOnly { .. }), "{e:?}");
        let m = e.to_string();
        assert!(
            m.contains("append-only") && m.contains("maintenance credentials"),
            "{m}"
        );
        // A 403 elsewhere (reading with wrong credentials) is not a refused removal.
        let other = Error::from_exit(
            "snapshots",
            1,
            "Fatal: unexpected HTTP response (403): 403 Forbidden",
            "r",
        );
        assert!(matches!(other, Error::CommandFailed { .. }), "{other:?}");
    }

    #[test]
    fn classifies_by_exit_code_not_by_wording() {
        // The 0.14 samples carry the old wording; the exit code alone decides.
        assert!(matches!(
            Error::from_exit("backup", 12, &sample("err_wrong_password.stderr"), "r"),
            Error::WrongPassword { .. }
        ));
        assert!(matches!(
            Error::from_exit("backup", 10, &sample("err_no_repo.stderr"), "r"),
            Error::RepositoryNotFound { .. }
        ));
        // "Is there a repository at ..." with exit 1 is a failure (e.g. access denied), never
        // "not found": only exit 10 may lead to `restic init`.
        assert!(matches!(
            Error::from_exit("cat", 1, &sample("err_no_repo.stderr"), "r"),
            Error::CommandFailed { status: 1, .. }
        ));
        assert!(matches!(
            Error::from_exit("backup", 1, &sample("err_missing_source.stderr"), "r"),
            Error::SourceMissing { .. }
        ));
        assert!(matches!(
            Error::from_exit(
                "backup",
                1,
                "Fatal: unable to save snapshot: snapshot is empty",
                "r"
            ),
            Error::EmptySource
        ));
        match Error::from_exit("prune", 11, &sample("err_locked_exclusive.txt"), "r") {
            Error::Locked { lock } => {
                assert_eq!(lock.pid, Some(13288));
                assert_eq!(lock.host, "vm");
            }
            other => panic!("{other:?}"),
        }
        // A lock failure whose text we cannot parse is still a lock failure.
        assert!(matches!(
            Error::from_exit("prune", 11, "something new", "r"),
            Error::Locked { .. }
        ));
        // The lock text with another exit code is not taken for a lock.
        assert!(matches!(
            Error::from_exit("prune", 1, &sample("err_locked_exclusive.txt"), "r"),
            Error::CommandFailed { .. }
        ));
        assert!(matches!(
            Error::from_exit("backup", 130, "", "r"),
            Error::Cancelled { .. }
        ));
        match Error::from_exit("check", 1, "boom\nsomething else went wrong", "r") {
            Error::CommandFailed {
                status,
                stderr_tail,
                ..
            } => {
                assert_eq!(status, 1);
                assert!(stderr_tail.ends_with("went wrong"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(600)), "10m");
        assert_eq!(human(Duration::from_secs(3)), "3s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_secs(3725)), "1h2m5s");
    }

    #[test]
    fn tail_keeps_the_end_on_char_boundaries() {
        assert_eq!(tail("  abc  ", 10), "abc");
        let t = tail("ääääää", 5);
        assert!(t.starts_with('…') && t.ends_with('ä'));
    }
}
