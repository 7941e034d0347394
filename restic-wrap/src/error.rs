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
    #[error("restic {subcommand} timed out after {after:?} and was killed")]
    Timeout { subcommand: String, after: Duration },
    #[error("restic {subcommand} was cancelled")]
    Cancelled { subcommand: String },
}

impl Error {
    /// Maps a non-zero exit to the most specific variant we can recognise from stderr.
    pub(crate) fn from_exit(subcommand: &str, status: i32, stderr: &str, location: &str) -> Error {
        if let Some(lock) = LockInfo::parse(stderr) {
            return Error::Locked {
                lock: Box::new(lock),
            };
        }
        if stderr.contains("wrong password or no key found") {
            return Error::WrongPassword {
                location: location.to_string(),
            };
        }
        // Local: "unable to open config file: stat <path>/config: no such file or directory".
        // S3/REST: "unable to open config file: Stat: The specified key does not exist." and kin.
        if stderr.contains("unable to open config file")
            || stderr.contains("Is there a repository at")
        {
            return Error::RepositoryNotFound {
                location: location.to_string(),
            };
        }
        if stderr.contains("all target directories/files do not exist") {
            return Error::SourceMissing {
                message: tail(stderr, 512),
            };
        }
        // restic 0.14 refuses to store a snapshot of an empty directory.
        if stderr.contains("snapshot is empty") {
            return Error::SourceMissing {
                message: "the volume is empty (restic does not store empty snapshots)".into(),
            };
        }
        Error::CommandFailed {
            subcommand: subcommand.to_string(),
            status,
            stderr_tail: tail(stderr, 2048),
        }
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
    fn classifies_real_stderr_samples() {
        assert!(matches!(
            Error::from_exit("backup", 1, &sample("err_wrong_password.stderr"), "r"),
            Error::WrongPassword { .. }
        ));
        assert!(matches!(
            Error::from_exit("backup", 1, &sample("err_no_repo.stderr"), "r"),
            Error::RepositoryNotFound { .. }
        ));
        assert!(matches!(
            Error::from_exit("backup", 1, &sample("err_missing_source.stderr"), "r"),
            Error::SourceMissing { .. }
        ));
        match Error::from_exit(
            "backup",
            1,
            "Fatal: unable to save snapshot: snapshot is empty",
            "r",
        ) {
            Error::SourceMissing { message } => assert!(message.contains("volume is empty")),
            other => panic!("{other:?}"),
        }
        match Error::from_exit("prune", 1, &sample("err_locked_exclusive.txt"), "r") {
            Error::Locked { lock } => {
                assert_eq!(lock.pid, Some(13288));
                assert_eq!(lock.host, "vm");
            }
            other => panic!("{other:?}"),
        }
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
    fn tail_keeps_the_end_on_char_boundaries() {
        assert_eq!(tail("  abc  ", 10), "abc");
        let t = tail("ääääää", 5);
        assert!(t.starts_with('…') && t.ends_with('ä'));
    }
}
