//! restic's caches on the node. Each repository has its own directory under `--cache-dir` (so a
//! sandbox that binds one exposes no other tenant's cached metadata), and its modification time
//! says when an operation last used it. restic cleans old entries inside a repository's directory
//! itself (`--cleanup-cache`); the directories of repositories this node no longer backs up would
//! otherwise stay for ever, so a sweep removes those unused for `--cache-max-age`, and with
//! `--cache-max-size-mib` the least recently used ones until the rest fits. A directory used
//! within `--max-duration` may belong to a running restic and is never removed for the size
//! bound (the default `--cache-max-age`, 30 days, is far above any operation's limit).
//!
//! The cache directory is the agent's own (restic writes hex-named files there, never a tenant),
//! so the sweep may walk it with plain `std::fs`; it never follows a symlink and stops at
//! [`MAX_DEPTH`] levels.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// restic's cache is a few levels deep (`<repo>/<id>/{data,index,snapshots}/<2 hex>/<file>`).
const MAX_DEPTH: usize = 8;

/// What the sweep keeps and removes.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Unused for longer: removed.
    pub max_age: Duration,
    /// The most all directories may hold together (0: no bound).
    pub max_bytes: u64,
    /// Used more recently: never removed for the size bound (a restic may still run with it).
    pub busy_within: Duration,
}

/// One sweep's outcome.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub removed: Vec<PathBuf>,
    /// What the directories kept hold.
    pub kept_bytes: u64,
}

/// Marks a repository's cache directory as used now (created if missing).
pub fn touch(dir: &Path) {
    let touched = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::File::open(dir))
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = touched {
        tracing::debug!(dir = %dir.display(), error = %e, "could not mark the restic cache as used");
    }
}

/// Bytes under `path`, not following symlinks, at most [`MAX_DEPTH`] levels down.
fn size_of(path: &Path, depth: usize) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    if depth >= MAX_DEPTH {
        return 0;
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| size_of(&e.path(), depth + 1))
        .sum()
}

/// Applies `policy` to the repository directories under `root`, as of `now`.
pub fn sweep(root: &Path, policy: Policy, now: SystemTime) -> Swept {
    let mut dirs: Vec<(PathBuf, Duration, u64)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        // `.tmp` holds running operations' temporary directories: not a repository's cache.
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| {
            let idle = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            let path = e.path();
            let bytes = size_of(&path, 0);
            (path, idle, bytes)
        })
        .collect();
    // Least recently used first.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.1));
    let mut total: u64 = dirs.iter().map(|d| d.2).sum();
    let mut swept = Swept::default();
    for (path, idle, bytes) in dirs {
        let too_old = idle > policy.max_age;
        let too_big = policy.max_bytes > 0 && total > policy.max_bytes;
        // Unused for max_age: gone (keep max_age above --max-duration, as the default is). Over
        // the size budget: gone only if no restic can still be using it.
        if too_old || (too_big && idle > policy.busy_within) {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), bytes, idle_secs = idle.as_secs(),
                        reason = if too_old { "unused for --cache-max-age" } else { "over --cache-max-size-mib" },
                        "removed a restic cache");
                    total -= bytes;
                    swept.removed.push(path);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "could not remove a restic cache")
                }
            }
        }
        swept.kept_bytes += bytes;
    }
    swept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(root: &Path, name: &str, bytes: usize, idle: Duration, now: SystemTime) -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(d.join("id/data/ab")).unwrap();
        std::fs::write(d.join("id/data/ab/pack"), vec![0u8; bytes]).unwrap();
        std::fs::File::open(&d)
            .unwrap()
            .set_modified(now - idle)
            .unwrap();
        d
    }

    #[test]
    fn old_caches_go_then_the_least_recently_used_until_the_rest_fits_but_never_a_busy_one() {
        let root = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let old = cache(root.path(), "old", 1000, 800 * hour, now);
        let lru = cache(root.path(), "lru", 4000, 20 * hour, now);
        let recent = cache(root.path(), "recent", 4000, 2 * hour, now);
        let busy = cache(root.path(), "busy", 4000, Duration::from_secs(60), now);
        let tmp = cache(root.path(), ".tmp", 100, 900 * hour, now);
        let policy = Policy {
            max_age: 720 * hour,
            max_bytes: 9000,
            busy_within: hour,
        };
        let swept = sweep(root.path(), policy, now);
        assert_eq!(swept.removed, vec![old.clone(), lru.clone()]);
        assert_eq!(swept.kept_bytes, 8000);
        assert!(recent.exists() && busy.exists() && !lru.exists() && !old.exists());
        assert!(tmp.exists(), "operations' temporary files are not a cache");
        // Over budget, but both left are within the busy window of a larger one: nothing goes.
        let policy = Policy {
            max_bytes: 1,
            busy_within: 3 * hour,
            ..policy
        };
        let swept = sweep(root.path(), policy, now);
        assert!(swept.removed.is_empty());
        assert_eq!(swept.kept_bytes, 8000);
    }

    #[test]
    fn touching_marks_a_cache_as_used_and_creates_it() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("repo");
        touch(&d);
        let idle = SystemTime::now()
            .duration_since(std::fs::metadata(&d).unwrap().modified().unwrap())
            .unwrap_or_default();
        assert!(idle < Duration::from_secs(5));
    }
}
