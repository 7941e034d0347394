//! serde types for restic's `--json` output (0.14+). Every field is defaulted, and unknown fields are
//! ignored, so newer restic versions that add fields do not break us.

use serde::Deserialize;

/// One line of `restic backup --json` (stdout) or of its JSON errors (stderr in 0.14).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "message_type", rename_all = "snake_case")]
pub enum BackupMessage {
    Status(BackupStatus),
    Summary(BackupSummary),
    Error(BackupError),
    VerboseStatus(serde_json::Value),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct BackupStatus {
    pub seconds_elapsed: u64,
    pub seconds_remaining: u64,
    pub percent_done: f64,
    pub total_files: u64,
    pub files_done: u64,
    pub total_bytes: u64,
    pub bytes_done: u64,
    pub error_count: u64,
    pub current_files: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct BackupSummary {
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unmodified: u64,
    pub dirs_new: u64,
    pub dirs_changed: u64,
    pub dirs_unmodified: u64,
    pub data_blobs: i64,
    pub tree_blobs: i64,
    pub data_added: u64,
    pub total_files_processed: u64,
    pub total_bytes_processed: u64,
    pub total_duration: f64,
    pub snapshot_id: String,
}

/// restic often serialises the Go error as `{}`; when it is an `*os.PathError` we get Op/Path/Err.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct BackupError {
    pub error: serde_json::Value,
    pub during: String,
    pub item: String,
}

impl BackupError {
    /// A readable message from whatever restic put into `error`.
    pub fn message(&self) -> String {
        match &self.error {
            serde_json::Value::Object(m) if m.is_empty() => "could not be read".to_string(),
            // restic 0.17+: {"message": "..."}.
            serde_json::Value::Object(m) if m.get("message").is_some_and(|v| v.is_string()) => m
                .get("message")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string(),
            serde_json::Value::Object(m) => {
                let op = m.get("Op").and_then(|v| v.as_str()).unwrap_or("access");
                match m.get("Err").and_then(|v| v.as_i64()) {
                    Some(errno) => format!(
                        "{op}: {}",
                        std::io::Error::from_raw_os_error(i32::try_from(errno).unwrap_or(0))
                    ),
                    None => format!("{op} failed"),
                }
            }
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
}

/// One line of `restic restore --json` (0.17+).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "message_type", rename_all = "snake_case")]
pub enum RestoreMessage {
    Status(RestoreStatus),
    Summary(RestoreSummary),
    Error(BackupError),
    VerboseStatus(RestoreItem),
}

/// What `restic restore -vv --json` says it did (or, with `--dry-run`, would do) with one entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct RestoreItem {
    /// `restored` (written: new, or a directory or symlink rewritten), `updated` (an existing
    /// file's content changed), `unchanged`, or `deleted` (with `--delete`).
    pub action: String,
    /// The path inside the snapshot (`/dir/file`); for `deleted`, the path under the target.
    pub item: String,
    pub size: u64,
}

/// The figures of a restore: its status lines and its summary carry the same ones (the summary has no
/// `percent_done`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct RestoreStatus {
    pub seconds_elapsed: u64,
    pub percent_done: f64,
    pub total_files: u64,
    pub files_restored: u64,
    pub files_skipped: u64,
    pub files_deleted: u64,
    pub total_bytes: u64,
    pub bytes_restored: u64,
    pub bytes_skipped: u64,
}

pub type RestoreSummary = RestoreStatus;

/// What restic 0.17+ prints on stderr as its last line with `--json` when it fails.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ExitError {
    pub message_type: String,
    pub code: i32,
    pub message: String,
}

/// An element of `restic key list --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Key {
    /// The key this password opened.
    pub current: bool,
    pub id: String,
    pub user_name: String,
    pub host_name: String,
    /// `2006-01-02 15:04:05` in the local time of the restic that listed it (the agent's, UTC).
    pub created: String,
}

/// A line of `restic ls --json`: the snapshot first (`struct_type` "snapshot"), then one node per
/// entry, depth first, each directory's entries sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct LsNode {
    pub struct_type: String,
    pub name: String,
    /// `file`, `dir`, `symlink`, `dev`, `chardev`, `fifo`, `socket`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Absolute inside the snapshot (`/dir/file`).
    pub path: String,
    pub size: u64,
}

impl LsNode {
    pub fn is_file(&self) -> bool {
        self.struct_type == "node" && self.kind == "file"
    }
}

/// An element of `restic snapshots --json`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    pub id: String,
    pub short_id: String,
    pub time: String,
    pub parent: Option<String>,
    pub tree: String,
    pub paths: Vec<String>,
    pub hostname: String,
    pub username: String,
    pub tags: Vec<String>,
    /// Written by restic 0.17 and later.
    pub summary: Option<SnapshotSummary>,
}

/// The part of a snapshot's `summary` Stowage reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct SnapshotSummary {
    /// Bytes of the files the backup read: what a full restore writes.
    pub total_bytes_processed: u64,
    /// Files (and other non-directory entries) in the snapshot.
    pub total_files_processed: u64,
    pub dirs_new: u64,
    pub dirs_changed: u64,
    pub dirs_unmodified: u64,
}

impl SnapshotSummary {
    /// Every entry of the snapshot's tree: its files and its directories.
    pub fn entries(&self) -> u64 {
        self.total_files_processed
            .saturating_add(self.dirs_new)
            .saturating_add(self.dirs_changed)
            .saturating_add(self.dirs_unmodified)
    }
}

impl Snapshot {
    /// When the snapshot was taken. restic writes local time with an offset, so compare these, not
    /// the strings: two nodes in different time zones would otherwise sort wrongly.
    pub fn timestamp(&self) -> Option<chrono::DateTime<chrono::FixedOffset>> {
        chrono::DateTime::parse_from_rfc3339(&self.time).ok()
    }

    /// The newest of `snapshots` (by timestamp; unparsable times sort first).
    pub fn newest(snapshots: impl IntoIterator<Item = Snapshot>) -> Option<Snapshot> {
        snapshots.into_iter().max_by_key(Snapshot::timestamp)
    }

    /// The value of a `key=value` tag.
    pub fn tag_value(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find_map(|t| t.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }
}

/// One group of `restic forget --json`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ForgetGroup {
    pub tags: Option<Vec<String>>,
    pub host: String,
    pub paths: Option<Vec<String>>,
    pub keep: Vec<Snapshot>,
    pub remove: Option<Vec<Snapshot>>,
    pub reasons: Vec<KeepReason>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct KeepReason {
    pub snapshot: Snapshot,
    pub matches: Vec<String>,
}

/// A lock file's content (`restic cat lock ID`), as its holder wrote it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LockFile {
    /// RFC 3339, the holder's clock: when it created or last refreshed the lock.
    pub time: String,
    pub exclusive: bool,
    pub hostname: String,
    pub username: String,
    pub pid: u32,
}

/// `restic stats --json` (restore-size, files-by-contents, raw-data and blobs-per-file modes).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Stats {
    pub total_size: u64,
    pub total_file_count: u64,
    pub total_blob_count: u64,
    pub snapshots_count: u64,
    pub total_uncompressed_size: u64,
    pub compression_ratio: f64,
    pub compression_progress: f64,
    pub compression_space_saving: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/restic-samples");

    fn sample(name: &str) -> String {
        std::fs::read_to_string(format!("{SAMPLES}/{name}")).unwrap()
    }

    fn lines(name: &str) -> Vec<BackupMessage> {
        sample(name)
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {e}: {l}")))
            .collect()
    }

    #[test]
    fn backup_stream_parses_status_then_summary() {
        for name in ["backup_initial.ndjson", "backup_incremental_1pct.ndjson"] {
            let msgs = lines(name);
            assert!(msgs.len() > 1, "{name}");
            let BackupMessage::Summary(s) = msgs.last().unwrap() else {
                panic!("{name}: last line is not the summary")
            };
            assert!(!s.snapshot_id.is_empty());
            assert_eq!(s.total_files_processed, 50_000);
            assert!(
                msgs[..msgs.len() - 1]
                    .iter()
                    .all(|m| matches!(m, BackupMessage::Status(_)))
            );
        }
        let incremental = lines("backup_incremental_1pct.ndjson");
        let Some(BackupMessage::Summary(s)) = incremental.last() else {
            panic!()
        };
        assert_eq!(s.files_changed, 500);
        assert_eq!(s.files_unmodified, 49_500);
    }

    #[test]
    fn backup_errors_from_stderr() {
        let msgs = lines("backup_with_errors.stderr");
        let errors: Vec<_> = msgs
            .iter()
            .filter_map(|m| match m {
                BackupMessage::Error(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(errors.len(), 3);
        assert_eq!(errors[0].message(), "could not be read");
        assert_eq!(errors[2].item, "/srv/errtest/tree/sub/secret.txt");
        assert!(
            errors[2].message().starts_with("open: "),
            "{}",
            errors[2].message()
        );
        assert!(
            errors[2].message().contains("ermission denied"),
            "{}",
            errors[2].message()
        );
    }

    #[test]
    fn restic_019_restore_and_exit_lines() {
        let status = r#"{"message_type":"status","seconds_elapsed":1,"percent_done":0.5,"total_files":4,"files_restored":2,"total_bytes":100,"bytes_restored":50}"#;
        let Ok(RestoreMessage::Status(s)) = serde_json::from_str(status) else {
            panic!("status")
        };
        assert_eq!((s.files_restored, s.bytes_restored), (2, 50));
        let err = r#"{"message_type":"error","error":{"message":"permission denied"},"during":"restore","item":"/a"}"#;
        let Ok(RestoreMessage::Error(e)) = serde_json::from_str(err) else {
            panic!("error")
        };
        assert_eq!(e.message(), "permission denied");
        let summary = r#"{"message_type":"summary","total_files":4,"files_restored":4,"total_bytes":100,"bytes_restored":100,"new_field":1}"#;
        assert!(matches!(
            serde_json::from_str(summary),
            Ok(RestoreMessage::Summary(RestoreSummary {
                files_restored: 4,
                ..
            }))
        ));
        let exit: ExitError = serde_json::from_str(
            r#"{"message_type":"exit_error","code":10,"message":"Fatal: repository does not exist"}"#,
        )
        .unwrap();
        assert_eq!(exit.code, 10);
    }

    #[test]
    fn restic_019_dry_run_restore_lines() {
        // Real `restic restore --dry-run -vv --delete --json` output (0.19.1).
        let lines = [
            r#"{"message_type":"verbose_status","action":"restored","item":"/a","size":2}"#,
            r#"{"message_type":"verbose_status","action":"updated","item":"/b","size":2}"#,
            r#"{"message_type":"verbose_status","action":"unchanged","item":"/sub/c","size":2}"#,
            r#"{"message_type":"verbose_status","action":"deleted","item":"/tmp/dr/tgt/new","size":0}"#,
        ];
        let items: Vec<RestoreItem> = lines
            .iter()
            .map(|l| match serde_json::from_str(l) {
                Ok(RestoreMessage::VerboseStatus(i)) => i,
                other => panic!("{l}: {other:?}"),
            })
            .collect();
        assert_eq!(
            items
                .iter()
                .map(|i| (i.action.as_str(), i.item.as_str(), i.size))
                .collect::<Vec<_>>(),
            [
                ("restored", "/a", 2),
                ("updated", "/b", 2),
                ("unchanged", "/sub/c", 2),
                ("deleted", "/tmp/dr/tgt/new", 0)
            ]
        );
    }

    #[test]
    fn snapshots_and_tags() {
        let snaps: Vec<Snapshot> = serde_json::from_str(&sample("snapshots.json")).unwrap();
        assert!(!snaps.is_empty());
        assert!(
            snaps
                .iter()
                .all(|s| s.id.len() == 64 && !s.short_id.is_empty())
        );
        let s = Snapshot {
            tags: vec!["stowage.dev/pvc=data".into(), "other".into()],
            ..Default::default()
        };
        assert_eq!(s.tag_value("stowage.dev/pvc"), Some("data"));
        assert_eq!(s.tag_value("stowage.dev/pv"), None);
    }

    #[test]
    fn newest_compares_instants_not_strings() {
        let at = |id: &str, time: &str| Snapshot {
            id: id.into(),
            time: time.into(),
            ..Default::default()
        };
        // 20:00+02:00 is 18:00Z: earlier than 19:00Z although its string sorts later.
        let snaps = vec![
            at("a", "2026-11-21T20:00:00+02:00"),
            at("b", "2026-11-21T19:00:00Z"),
        ];
        assert_eq!(Snapshot::newest(snaps).map(|s| s.id).as_deref(), Some("b"));
        assert_eq!(Snapshot::newest(Vec::new()), None);
    }

    #[test]
    fn forget_groups_parse() {
        for name in ["forget.json", "forget_dryrun.json"] {
            let groups: Vec<ForgetGroup> = serde_json::from_str(&sample(name)).unwrap();
            assert!(!groups.is_empty(), "{name}");
            assert!(groups.iter().all(|g| !g.keep.is_empty()), "{name}");
        }
        // forget --prune: the JSON array is the first line, followed by plain text.
        let out = sample("forget_prune.stdout");
        let first = out.lines().next().unwrap();
        let groups: Vec<ForgetGroup> = serde_json::from_str(first).unwrap();
        assert!(!groups.is_empty());
    }

    #[test]
    fn stats_modes_parse() {
        for name in [
            "stats_raw_data.json",
            "stats_restore_size.json",
            "stats_files_by_contents.json",
            "stats_blobs_per_file.json",
        ] {
            let s: Stats = serde_json::from_str(sample(name).trim()).unwrap();
            assert!(s.total_size > 0, "{name}");
        }
    }
}
