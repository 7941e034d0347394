//! restic's memory, estimated before it starts, so the restic processes of one node together stay
//! within `--memory-budget`. restic keeps the repository's index in memory, so its peak grows with
//! the index; the estimate is a fixed part plus a multiple of the index's size on disk. Both are
//! fitted to `scripts/bench-restic-memory` (figures in docs/benchmarks.md).

use std::path::Path;

use restic_wrap::{Backend, Repository};

/// What restic is asked to do: each loads the index, with different working sets on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Backup,
    Restore,
    Check,
    Prune,
    /// Listing snapshots, reading figures, opening the repository.
    Read,
}

impl Operation {
    /// (fixed MiB, peak bytes per byte of index on disk), from the 1M-blob measurement, rounded up.
    /// A first backup into an empty repository is estimated at the fixed part: its peak grows with
    /// the data it adds (460 MiB for a first backup of 1M files), which no index predicts.
    fn model(self) -> (u64, f64) {
        match self {
            Operation::Backup => (BACKUP_FIXED_MIB, BACKUP_PER_INDEX_BYTE),
            Operation::Restore => (RESTORE_FIXED_MIB, RESTORE_PER_INDEX_BYTE),
            Operation::Check => (CHECK_FIXED_MIB, CHECK_PER_INDEX_BYTE),
            Operation::Prune => (PRUNE_FIXED_MIB, PRUNE_PER_INDEX_BYTE),
            Operation::Read => (READ_FIXED_MIB, READ_PER_INDEX_BYTE),
        }
    }
}

// Fitted through 100,000 and 1,000,000 blobs (index 3.8 and 38.1 MiB on disk): intercept and slope
// per operation, then about 10% added. Measured peaks at 1M blobs: incremental backup 290 MiB,
// restore 284, check 299, forget + prune 303, stats 286, snapshots 65.
const BACKUP_FIXED_MIB: u64 = 80;
const BACKUP_PER_INDEX_BYTE: f64 = 6.5;
const RESTORE_FIXED_MIB: u64 = 75;
const RESTORE_PER_INDEX_BYTE: f64 = 6.5;
const CHECK_FIXED_MIB: u64 = 80;
const CHECK_PER_INDEX_BYTE: f64 = 6.5;
const PRUNE_FIXED_MIB: u64 = 135;
const PRUNE_PER_INDEX_BYTE: f64 = 5.5;
const READ_FIXED_MIB: u64 = 75;
const READ_PER_INDEX_BYTE: f64 = 6.5;

/// What a restore holds per entry of the snapshot's tree, on top of the index: restic walks the
/// tree and plans every file it writes. Measured over 1,000,980 entries whose contents deduplicated
/// to 26 blobs (a 44 KiB index): plain `restic restore` peaked at 466 MiB, about 410 bytes per
/// entry above the fixed part; rounded up for margin.
const RESTORE_PER_ENTRY_BYTES: u64 = 512;
/// The same for a dry run (`restore --dry-run`, a preview), which plans nothing: 145 MiB peak over
/// the same entries (`STOWAGE_BENCH_ONLY=preview`), about 84 bytes per entry; rounded up.
const PREVIEW_PER_ENTRY_BYTES: u64 = 128;

/// The part of a restore's estimate that grows with the snapshot's entries (files and
/// directories), in MiB; `dry_run` for a preview.
pub fn restore_tree_mib(entries: u64, dry_run: bool) -> u64 {
    let per_entry = if dry_run {
        PREVIEW_PER_ENTRY_BYTES
    } else {
        RESTORE_PER_ENTRY_BYTES
    };
    entries.saturating_mul(per_entry).div_ceil(1024 * 1024)
}

/// Index files looked at per repository at most: a bound on the work of an estimate.
const MAX_INDEX_FILES: usize = 100_000;

/// restic's estimated peak for `op` on a repository whose index takes `index_bytes` on disk, in MiB.
pub fn estimate_mib(op: Operation, index_bytes: u64) -> u64 {
    let (fixed, per_byte) = op.model();
    let scaled = (index_bytes as f64 * per_byte / (1024.0 * 1024.0)).ceil();
    fixed.saturating_add(scaled as u64)
}

/// The size of the repository's index on disk as far as this node knows: a local repository's
/// `index/` directory, otherwise the copy in restic's cache for the repository (`cache`, which
/// holds one directory per repository id). 0 when nothing is known yet (the first operation).
pub fn index_bytes(repo: &Repository, cache: &Path) -> u64 {
    match &repo.backend {
        Backend::Local { path } => dir_bytes(&Path::new(path).join("index"), 2),
        _ => std::fs::read_dir(cache)
            .map(|ids| {
                ids.flatten()
                    .map(|id| dir_bytes(&id.path().join("index"), 2))
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0),
    }
}

/// Bytes of the regular files below `dir`, at most `depth` levels down. Symlinks are not followed
/// (`DirEntry::metadata` does not follow them), and at most [`MAX_INDEX_FILES`] are counted.
fn dir_bytes(dir: &Path, depth: u32) -> u64 {
    let mut total = 0u64;
    let mut seen = 0usize;
    let mut stack = vec![(dir.to_path_buf(), 0u32)];
    while let Some((d, level)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() && level + 1 < depth {
                stack.push((e.path(), level + 1));
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
                seen += 1;
                if seen >= MAX_INDEX_FILES {
                    return total;
                }
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_cover_the_measured_peaks_at_a_million_blobs() {
        // scripts/bench-restic-memory: 1,000,000 blobs, index 38.1 MiB on disk.
        let index = (38.1 * 1024.0 * 1024.0) as u64;
        for (op, measured) in [
            (Operation::Backup, 290),
            (Operation::Restore, 284),
            (Operation::Check, 299),
            (Operation::Prune, 303),
            (Operation::Read, 286),
        ] {
            let e = estimate_mib(op, index);
            assert!(
                e >= measured && e <= measured * 13 / 10,
                "{op:?}: {e} MiB for {measured}"
            );
        }
    }

    #[test]
    fn estimates_grow_with_the_index_and_start_at_the_fixed_part() {
        assert_eq!(estimate_mib(Operation::Backup, 0), BACKUP_FIXED_MIB);
        let small = estimate_mib(Operation::Check, 1 << 20);
        let large = estimate_mib(Operation::Check, 100 << 20);
        assert!(large > small && small > CHECK_FIXED_MIB, "{small} {large}");
    }

    #[test]
    fn restores_of_a_million_small_files_are_estimated_above_their_measured_peaks() {
        // 1,000,980 entries, a 44 KiB index: plain restic restore 466 MiB, a dry run 145 MiB.
        let index = estimate_mib(Operation::Restore, 44 * 1024);
        for (dry_run, measured) in [(false, 466), (true, 145)] {
            let e = index + restore_tree_mib(1_000_980, dry_run);
            assert!(
                e >= measured && e <= measured * 3 / 2,
                "dry run {dry_run}: {e} MiB for {measured}"
            );
        }
        assert_eq!(restore_tree_mib(0, false), 0);
        assert_eq!(
            restore_tree_mib(u64::MAX, false),
            u64::MAX.div_ceil(1024 * 1024)
        );
    }

    #[test]
    fn index_size_of_a_local_repository_and_of_a_cache() {
        let t = tempfile::tempdir().unwrap();
        let idx = t.path().join("repo/index");
        std::fs::create_dir_all(&idx).unwrap();
        std::fs::write(idx.join("a"), vec![0u8; 1000]).unwrap();
        std::fs::write(idx.join("b"), vec![0u8; 24]).unwrap();
        // A symlink is not followed: a tenant-writable path could point anywhere.
        std::os::unix::fs::symlink("/etc/passwd", idx.join("c")).unwrap();
        let local = Repository {
            backend: Backend::Local {
                path: t.path().join("repo").display().to_string(),
            },
            password: "pw".into(),
        };
        assert_eq!(index_bytes(&local, t.path()), 1024);
        let cache = t.path().join("cache");
        let cached = cache.join("0123abcd/index/ab");
        std::fs::create_dir_all(&cached).unwrap();
        std::fs::write(cached.join("abff"), vec![0u8; 4096]).unwrap();
        let s3 = Repository {
            backend: Backend::S3 {
                endpoint: "http://127.0.0.1:9".into(),
                bucket: "b".into(),
                prefix: String::new(),
                region: String::new(),
                access_key_id: "k".into(),
                secret_access_key: "s".into(),
            },
            password: "pw".into(),
        };
        assert_eq!(index_bytes(&s3, &cache), 4096);
        assert_eq!(index_bytes(&s3, &t.path().join("none")), 0);
    }
}
