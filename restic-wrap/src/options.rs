//! Option structs that render restic's argv. Flags are named once, here; call sites fill structs.
//!
//! Length: over 500 lines with its unit tests (the argv of every option); the code is under 500.

use std::ffi::OsString;
use std::path::PathBuf;

/// A restic subcommand with its options.
pub trait Subcommand {
    /// The subcommand's words and flags (without global options).
    fn args(&self) -> Vec<OsString>;
    /// Whether it takes an exclusive repository lock (check, prune, forget ...).
    fn exclusive_lock(&self) -> bool {
        false
    }
}

/// Options valid for every subcommand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GlobalOptions {
    pub cache_dir: Option<PathBuf>,
    /// `--cleanup-cache`: restic removes its own old cache entries (those of repository ids not
    /// used for 30 days) inside the cache directory.
    pub cleanup_cache: bool,
    pub no_cache: bool,
    /// Take no repository lock (restores from a repository mounted read-only).
    pub no_lock: bool,
    /// KiB/s.
    pub limit_upload: Option<u32>,
    /// KiB/s.
    pub limit_download: Option<u32>,
    /// restic's own wait for a held lock (`--retry-lock`), for runs the caller cannot repeat,
    /// such as a backup of a stream.
    pub retry_lock: Option<std::time::Duration>,
    /// Passed verbatim before the subcommand (e.g. `-o s3.storage-class=...`). Never for secrets.
    pub extra_args: Vec<String>,
}

impl GlobalOptions {
    pub fn args(&self) -> Vec<OsString> {
        let mut a = Vec::new();
        if let Some(dir) = &self.cache_dir {
            a.push("--cache-dir".into());
            a.push(dir.clone().into_os_string());
        }
        if self.cleanup_cache {
            a.push("--cleanup-cache".into());
        }
        if self.no_cache {
            a.push("--no-cache".into());
        }
        if self.no_lock {
            a.push("--no-lock".into());
        }
        if let Some(wait) = self.retry_lock.filter(|w| !w.is_zero()) {
            a.push("--retry-lock".into());
            a.push(format!("{}s", wait.as_secs().max(1)).into());
        }
        if let Some(kib) = self.limit_upload.filter(|k| *k > 0) {
            a.push("--limit-upload".into());
            a.push(kib.to_string().into());
        }
        if let Some(kib) = self.limit_download.filter(|k| *k > 0) {
            a.push("--limit-download".into());
            a.push(kib.to_string().into());
        }
        a.extend(self.extra_args.iter().map(OsString::from));
        a
    }
}

fn push_opt(a: &mut Vec<OsString>, flag: &str, v: &Option<String>) {
    if let Some(v) = v {
        a.push(flag.into());
        a.push(v.into());
    }
}

fn push_each(a: &mut Vec<OsString>, flag: &str, vs: &[String]) {
    for v in vs {
        a.push(flag.into());
        a.push(v.into());
    }
}

/// Renders a tag filter: all tags of one `--tag` must match (restic ANDs comma-joined tags).
fn push_tag_filter(a: &mut Vec<OsString>, tags: &[String]) {
    if !tags.is_empty() {
        a.push("--tag".into());
        a.push(tags.join(",").into());
    }
}

/// `restic init`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitOptions;

impl Subcommand for InitOptions {
    fn args(&self) -> Vec<OsString> {
        vec!["init".into()]
    }
}

/// `restic cat config`: cheap probe that the repository exists and the password opens it.
/// Read-only, so it takes no lock (with a lock it would fail behind any exclusive holder).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatConfigOptions;

impl Subcommand for CatConfigOptions {
    fn args(&self) -> Vec<OsString> {
        vec!["cat".into(), "config".into(), "--no-lock".into()]
    }
}

/// `restic backup --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupOptions {
    /// What to back up, relative to the process's working directory (so snapshot trees do not
    /// contain node-specific path prefixes such as the pod UID).
    pub paths: Vec<PathBuf>,
    pub host: Option<String>,
    pub tags: Vec<String>,
    pub parent: Option<String>,
    pub excludes: Vec<String>,
    /// Override the snapshot time (RFC 3339 or restic's "2006-01-02 15:04:05").
    pub time: Option<String>,
    pub one_file_system: bool,
    /// Read from standard input instead of paths, stored under this file name.
    pub stdin_filename: Option<String>,
}

impl Subcommand for BackupOptions {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["backup".into(), "--json".into()];
        push_opt(&mut a, "--host", &self.host);
        for t in &self.tags {
            a.push("--tag".into());
            a.push(t.into());
        }
        push_opt(&mut a, "--parent", &self.parent);
        push_each(&mut a, "--exclude", &self.excludes);
        push_opt(&mut a, "--time", &self.time);
        if self.one_file_system {
            a.push("--one-file-system".into());
        }
        if let Some(name) = &self.stdin_filename {
            a.push("--stdin".into());
            a.push("--stdin-filename".into());
            a.push(name.into());
        }
        a.push("--".into());
        a.extend(self.paths.iter().map(|p| p.clone().into_os_string()));
        a
    }
}

/// `restic restore <snapshot> --target <dir>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    pub snapshot: String,
    pub target: PathBuf,
    /// Absolute paths inside the snapshot ("/db/base").
    pub includes: Vec<String>,
    /// Files of include patterns, one per line (`--include-file`): for includes too many for argv.
    pub include_files: Vec<PathBuf>,
    pub excludes: Vec<String>,
    pub verify: bool,
    /// Write runs of zeros as holes (`--sparse`), so sparse files stay sparse.
    pub sparse: bool,
    /// Write nothing; report, file by file, what a restore would do (`--dry-run -vv`).
    pub dry_run: bool,
    /// Delete what the snapshot does not have, within `includes` (`--delete`). Only with
    /// `dry_run` here: the agent makes a target equal to a snapshot by a swap of its own.
    pub delete: bool,
}

impl Subcommand for RestoreOptions {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["restore".into(), "--json".into(), "--target".into()];
        a.push(self.target.clone().into_os_string());
        push_each(&mut a, "--include", &self.includes);
        for f in &self.include_files {
            a.push("--include-file".into());
            a.push(f.clone().into_os_string());
        }
        push_each(&mut a, "--exclude", &self.excludes);
        if self.verify {
            a.push("--verify".into());
        }
        if self.sparse {
            a.push("--sparse".into());
        }
        if self.dry_run {
            // Twice verbose: one `verbose_status` line per entry, with its action.
            a.extend(["--dry-run".into(), "-vv".into()]);
            if self.delete {
                a.push("--delete".into());
            }
        }
        a.push("--".into());
        a.push((&self.snapshot).into());
        a
    }
}

/// `restic dump <snapshot> <path>`: one file's content on stdout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DumpOptions {
    pub snapshot: String,
    /// Absolute path inside the snapshot ("/shop-pg-0-db.sql").
    pub path: String,
}

impl Subcommand for DumpOptions {
    fn args(&self) -> Vec<OsString> {
        vec![
            "dump".into(),
            "--".into(),
            (&self.snapshot).into(),
            (&self.path).into(),
        ]
    }
}

/// `restic key list --json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyListOptions;

impl Subcommand for KeyListOptions {
    fn args(&self) -> Vec<OsString> {
        vec!["key".into(), "list".into(), "--json".into()]
    }
}

/// `restic key add --new-password-file /dev/stdin`: the new password comes on stdin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyAddOptions;

impl Subcommand for KeyAddOptions {
    fn args(&self) -> Vec<OsString> {
        vec![
            "key".into(),
            "add".into(),
            "--new-password-file".into(),
            "/dev/stdin".into(),
        ]
    }
}

/// `restic key remove <id>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyRemoveOptions {
    pub id: String,
}

impl Subcommand for KeyRemoveOptions {
    fn args(&self) -> Vec<OsString> {
        vec![
            "key".into(),
            "remove".into(),
            "--".into(),
            (&self.id).into(),
        ]
    }
}

/// `restic ls --json <snapshot>`: the snapshot's entries, one JSON line each, in tree order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LsOptions {
    pub snapshot: String,
}

impl Subcommand for LsOptions {
    fn args(&self) -> Vec<OsString> {
        vec![
            "ls".into(),
            "--json".into(),
            "--".into(),
            (&self.snapshot).into(),
        ]
    }
}

/// `restic snapshots --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotsOptions {
    pub host: Option<String>,
    /// All of these tags must be present.
    pub tags: Vec<String>,
    /// Only the newest snapshot per group (`--latest 1`).
    pub latest: Option<u32>,
    /// Specific snapshot ids, or "latest".
    pub ids: Vec<String>,
}

impl Subcommand for SnapshotsOptions {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["snapshots".into(), "--json".into()];
        push_opt(&mut a, "--host", &self.host);
        push_tag_filter(&mut a, &self.tags);
        if let Some(n) = self.latest {
            a.push("--latest".into());
            a.push(n.to_string().into());
        }
        if !self.ids.is_empty() {
            a.push("--".into());
            a.extend(self.ids.iter().map(OsString::from));
        }
        a
    }
}

/// Retention rules for `restic forget`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// restic duration, e.g. "2y5m7d3h".
    pub keep_within: Option<String>,
    pub keep_tags: Vec<String>,
}

impl Retention {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `restic forget --json`. Always scoped by tags/host so retention never mixes volume identities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForgetOptions {
    pub retention: Retention,
    pub host: Option<String>,
    pub tags: Vec<String>,
    /// restic's --group-by, e.g. "host,tags".
    pub group_by: Option<String>,
    pub dry_run: bool,
    pub prune: bool,
}

impl Subcommand for ForgetOptions {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["forget".into(), "--json".into()];
        let r = &self.retention;
        for (flag, v) in [
            ("--keep-last", r.keep_last),
            ("--keep-hourly", r.keep_hourly),
            ("--keep-daily", r.keep_daily),
            ("--keep-weekly", r.keep_weekly),
            ("--keep-monthly", r.keep_monthly),
            ("--keep-yearly", r.keep_yearly),
        ] {
            if let Some(n) = v {
                a.push(flag.into());
                a.push(n.to_string().into());
            }
        }
        push_opt(&mut a, "--keep-within", &r.keep_within);
        push_each(&mut a, "--keep-tag", &r.keep_tags);
        push_opt(&mut a, "--host", &self.host);
        push_tag_filter(&mut a, &self.tags);
        push_opt(&mut a, "--group-by", &self.group_by);
        if self.dry_run {
            a.push("--dry-run".into());
        }
        if self.prune {
            a.push("--prune".into());
        }
        a
    }
    fn exclusive_lock(&self) -> bool {
        true
    }
}

/// `restic forget <id>...`: removes exactly these snapshots, no policy. Used after a dry-run
/// `forget` with the policy, once the caller has decided what the policy must not remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForgetIdsOptions {
    pub ids: Vec<String>,
}

impl Subcommand for ForgetIdsOptions {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["forget".into(), "--".into()];
        a.extend(self.ids.iter().map(OsString::from));
        a
    }
    fn exclusive_lock(&self) -> bool {
        true
    }
}

/// `restic prune`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneOptions {
    /// e.g. "5%" or "unlimited".
    pub max_unused: Option<String>,
    pub dry_run: bool,
}

impl Subcommand for PruneOptions {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["prune".into()];
        push_opt(&mut a, "--max-unused", &self.max_unused);
        if self.dry_run {
            a.push("--dry-run".into());
        }
        a
    }
    fn exclusive_lock(&self) -> bool {
        true
    }
}

/// `restic check`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// e.g. "5%" or "1/10".
    pub read_data_subset: Option<String>,
}

impl Subcommand for CheckOptions {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["check".into()];
        push_opt(&mut a, "--read-data-subset", &self.read_data_subset);
        a
    }
    fn exclusive_lock(&self) -> bool {
        true
    }
}

/// `restic tag --add <tags> <snapshot>`: restic rewrites the snapshot under a new id (keeping the
/// old one as its `original`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagOptions {
    pub add: Vec<String>,
    pub snapshot: String,
}

impl Subcommand for TagOptions {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["tag".into(), "--json".into()];
        push_each(&mut a, "--add", &self.add);
        a.push(self.snapshot.clone().into());
        a
    }
}

/// `restic unlock`: removes only the locks restic itself considers stale (not refreshed for 30
/// minutes, from any host; restic refreshes live locks every 5). Never `--remove-all`, which also
/// deletes live locks, and so is not offered here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnlockOptions;

impl Subcommand for UnlockOptions {
    fn args(&self) -> Vec<OsString> {
        vec!["unlock".into()]
    }
}

/// `restic list locks`: ids of the lock files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListLocksOptions;

impl Subcommand for ListLocksOptions {
    fn args(&self) -> Vec<OsString> {
        vec!["list".into(), "locks".into(), "--no-lock".into()]
    }
}

/// `restic cat lock ID --json`: one lock file's content, read without taking a lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatLockOptions {
    pub id: String,
}

impl Subcommand for CatLockOptions {
    fn args(&self) -> Vec<OsString> {
        vec![
            "cat".into(),
            "lock".into(),
            "--no-lock".into(),
            "--json".into(),
            "--".into(),
            self.id.clone().into(),
        ]
    }
}

/// `restic stats --json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StatsMode {
    #[default]
    RestoreSize,
    FilesByContents,
    RawData,
    BlobsPerFile,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsOptions {
    pub mode: StatsMode,
    pub host: Option<String>,
    pub tags: Vec<String>,
    pub snapshots: Vec<String>,
}

impl Subcommand for StatsOptions {
    fn args(&self) -> Vec<OsString> {
        let mode = match self.mode {
            StatsMode::RestoreSize => "restore-size",
            StatsMode::FilesByContents => "files-by-contents",
            StatsMode::RawData => "raw-data",
            StatsMode::BlobsPerFile => "blobs-per-file",
        };
        let mut a: Vec<OsString> = vec![
            "stats".into(),
            "--json".into(),
            "--mode".into(),
            mode.into(),
        ];
        push_opt(&mut a, "--host", &self.host);
        push_tag_filter(&mut a, &self.tags);
        if !self.snapshots.is_empty() {
            a.push("--".into());
            a.extend(self.snapshots.iter().map(OsString::from));
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: Vec<OsString>) -> Vec<String> {
        v.into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn backup_renders_identity_parent_and_relative_paths() {
        let o = BackupOptions {
            paths: vec![".".into()],
            host: Some("shop/data".into()),
            tags: vec![
                "stowage.dev/namespace=shop".into(),
                "stowage.dev/pvc=data".into(),
            ],
            parent: Some("abc123".into()),
            excludes: vec!["*.tmp".into()],
            ..Default::default()
        };
        assert_eq!(
            strs(o.args()),
            [
                "backup",
                "--json",
                "--host",
                "shop/data",
                "--tag",
                "stowage.dev/namespace=shop",
                "--tag",
                "stowage.dev/pvc=data",
                "--parent",
                "abc123",
                "--exclude",
                "*.tmp",
                "--",
                "."
            ]
        );
        assert!(!o.exclusive_lock());
    }

    #[test]
    fn backup_from_stdin() {
        let o = BackupOptions {
            stdin_filename: Some("shop-db-0-postgres.sql".into()),
            ..Default::default()
        };
        assert_eq!(
            strs(o.args()),
            [
                "backup",
                "--json",
                "--stdin",
                "--stdin-filename",
                "shop-db-0-postgres.sql",
                "--"
            ]
        );
    }

    #[test]
    fn snapshot_tag_filter_is_anded() {
        let o = SnapshotsOptions {
            tags: vec!["a=1".into(), "b=2".into()],
            latest: Some(1),
            ..Default::default()
        };
        assert_eq!(
            strs(o.args()),
            ["snapshots", "--json", "--tag", "a=1,b=2", "--latest", "1"]
        );
    }

    #[test]
    fn sparse_restores_and_dumps_keep_user_values_after_double_dash() {
        let o = RestoreOptions {
            snapshot: "abcdef12".into(),
            target: "/t".into(),
            sparse: true,
            ..Default::default()
        };
        assert_eq!(
            strs(o.args()),
            [
                "restore", "--json", "--target", "/t", "--sparse", "--", "abcdef12"
            ]
        );
        let d = DumpOptions {
            snapshot: "abcdef12".into(),
            path: "/-rf.sql".into(),
        };
        assert_eq!(strs(d.args()), ["dump", "--", "abcdef12", "/-rf.sql"]);
    }

    #[test]
    fn a_dry_run_restore_is_verbose_and_deletes_only_when_asked() {
        let o = RestoreOptions {
            snapshot: "abcdef12".into(),
            target: "/t".into(),
            dry_run: true,
            delete: true,
            ..Default::default()
        };
        assert_eq!(
            strs(o.args()),
            [
                "restore",
                "--json",
                "--target",
                "/t",
                "--dry-run",
                "-vv",
                "--delete",
                "--",
                "abcdef12"
            ]
        );
        // `delete` never reaches a restore that writes.
        let o = RestoreOptions { delete: true, ..o };
        let o = RestoreOptions {
            dry_run: false,
            ..o
        };
        assert!(!strs(o.args()).contains(&"--delete".to_string()));
    }

    #[test]
    fn restore_puts_snapshot_after_double_dash() {
        let o = RestoreOptions {
            snapshot: "latest".into(),
            target: "/t".into(),
            includes: vec!["/db".into()],
            ..Default::default()
        };
        assert_eq!(
            strs(o.args()),
            [
                "restore",
                "--json",
                "--target",
                "/t",
                "--include",
                "/db",
                "--",
                "latest"
            ]
        );
    }

    #[test]
    fn forget_renders_retention_scoped_by_tags() {
        let o = ForgetOptions {
            retention: Retention {
                keep_last: Some(5),
                keep_daily: Some(14),
                keep_within: Some("30d".into()),
                keep_tags: vec!["keep".into()],
                ..Default::default()
            },
            tags: vec!["stowage.dev/pvc=data".into()],
            group_by: Some("host".into()),
            prune: true,
            ..Default::default()
        };
        assert_eq!(
            strs(o.args()),
            [
                "forget",
                "--json",
                "--keep-last",
                "5",
                "--keep-daily",
                "14",
                "--keep-within",
                "30d",
                "--keep-tag",
                "keep",
                "--tag",
                "stowage.dev/pvc=data",
                "--group-by",
                "host",
                "--prune"
            ]
        );
        assert!(o.exclusive_lock());
        assert!(Retention::default().is_empty());
    }

    #[test]
    fn maintenance_commands() {
        assert_eq!(
            strs(
                CheckOptions {
                    read_data_subset: Some("5%".into())
                }
                .args()
            ),
            ["check", "--read-data-subset", "5%"]
        );
        assert_eq!(strs(UnlockOptions.args()), ["unlock"]);
        assert_eq!(strs(PruneOptions::default().args()), ["prune"]);
        assert_eq!(strs(InitOptions.args()), ["init"]);
        assert_eq!(
            strs(CatConfigOptions.args()),
            ["cat", "config", "--no-lock"]
        );
        assert_eq!(
            strs(
                CatLockOptions {
                    id: "32f48212".into()
                }
                .args()
            ),
            ["cat", "lock", "--no-lock", "--json", "--", "32f48212"]
        );
        let s = StatsOptions {
            mode: StatsMode::RawData,
            ..Default::default()
        };
        assert_eq!(strs(s.args()), ["stats", "--json", "--mode", "raw-data"]);
    }

    #[test]
    fn global_options_skip_zero_limits() {
        let g = GlobalOptions {
            cache_dir: Some("/c".into()),
            limit_upload: Some(0),
            limit_download: Some(512),
            ..Default::default()
        };
        assert_eq!(
            strs(g.args()),
            ["--cache-dir", "/c", "--limit-download", "512"]
        );
        let wait = GlobalOptions {
            retry_lock: Some(std::time::Duration::from_secs(3600)),
            ..Default::default()
        };
        assert_eq!(strs(wait.args()), ["--retry-lock", "3600s"]);
    }
}
