//! Reading a repository's state without changing it: its lock files (read with `--no-lock`, so
//! looking adds no lock of our own) and its figures (`restic stats --mode raw-data`).

use std::time::Duration;

use restic_wrap::Restic;
use restic_wrap::options::{StatsMode, StatsOptions};
use stowage_proto::v1::{RepositoryFigures, RepositoryLock};

use crate::error::AgentError;

/// Lock files read per call at most. Each read is one restic run (with its key derivation), and a
/// repository with more locks than this has a problem the count alone shows.
pub const MAX_LOCKS_READ: usize = 32;

/// How long reading figures waits for an exclusive lock (a prune) before giving up: the figures
/// are read again later, and a prune refreshes them anyway.
pub const FIGURES_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Shown ids are this long, as in restic's own messages.
const SHORT_ID: usize = 8;

/// The repository's lock files: those read (at most [`MAX_LOCKS_READ`]) and how many were not
/// (beyond the bound, or removed between listing and reading, which is normal for live locks).
pub async fn locks(restic: &Restic) -> Result<(Vec<RepositoryLock>, u32), AgentError> {
    let ids = restic.list_locks().await?;
    let now = chrono::Utc::now();
    let mut read = Vec::new();
    let mut unread = 0u32;
    for (i, id) in ids.iter().enumerate() {
        if i >= MAX_LOCKS_READ {
            unread = unread.saturating_add(1);
            continue;
        }
        match restic.read_lock(id).await {
            Ok(lock) => {
                let age = chrono::DateTime::parse_from_rfc3339(&lock.time)
                    .map(|t| (now - t.to_utc()).as_seconds_f64().max(0.0))
                    .unwrap_or(0.0);
                read.push(RepositoryLock {
                    id: id.chars().take(SHORT_ID).collect(),
                    hostname: lock.hostname,
                    pid: lock.pid,
                    exclusive: lock.exclusive,
                    age_seconds: age,
                });
            }
            Err(e) => {
                tracing::info!(lock = %id, error = %e, "a listed lock could not be read (its holder may have released it)");
                unread = unread.saturating_add(1);
            }
        }
    }
    Ok((read, unread))
}

/// Snapshots and stored bytes, as `restic stats --mode raw-data` counts them.
pub async fn figures(restic: &Restic) -> Result<RepositoryFigures, AgentError> {
    let opts = StatsOptions {
        mode: StatsMode::RawData,
        ..Default::default()
    };
    let s = restic.stats(&opts).await?;
    // The password's key and its age (what the key-age alert watches); a failure here costs the
    // figure only.
    let key_created = match restic.keys().await {
        Ok(keys) => keys
            .into_iter()
            .find(|k| k.current)
            .map(|k| crate::keys::created_rfc3339(&k.created))
            .unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "listing the repository's keys");
            String::new()
        }
    };
    Ok(RepositoryFigures {
        snapshots: s.snapshots_count,
        size_bytes: s.total_size,
        key_created,
    })
}
