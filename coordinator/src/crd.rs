//! Custom resources of API group `stowage.dev`, version `v1alpha1`. Rust types are the source of
//! truth; `crdgen` renders them into the chart, and a test fails when the checked-in YAML drifts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A key of a Secret in the object's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// Where the restic repository lives. Exactly one of `local`, `s3`, `rest` must be set (checked by
/// the controller, which reports the field in a condition). Unknown keys are kept rather than pruned
/// by the API server, so a typo or an unsupported backend type (`gcs:`) is reported by name instead
/// of silently disappearing.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct BackendSpec {
    pub repo_password_secret_ref: SecretKeyRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rest: Option<RestBackend>,
    /// Upload bandwidth limit for restic, KiB/s.
    #[serde(
        default,
        rename = "limitUploadKiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub limit_upload_kib: Option<u32>,
    /// Download bandwidth limit for restic, KiB/s.
    #[serde(
        default,
        rename = "limitDownloadKiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub limit_download_kib: Option<u32>,
    /// Whether a run may create the repository when it does not exist. `true`: always; `false`:
    /// never. Unset: only the runs of a Schedule that has never had a successful backup (its first
    /// runs); a hand-made run with its own backend never. A typo in a bucket, prefix or path must not
    /// silently start a new, empty history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initialize: Option<bool>,
    /// Keys this version does not know; the controller names them in a condition.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// A directory that exists on every node and is seen by the agents at this path.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalBackend {
    pub path: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Backend {
    pub endpoint: String,
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(rename = "accessKeyIDSecretRef")]
    pub access_key_id_secret_ref: SecretKeyRef,
    pub secret_access_key_secret_ref: SecretKeyRef,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestBackend {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_secret_ref: Option<SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
}

/// Limits on volume backups running at once for one run.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Concurrency {
    /// Per node (the agent's own --max-concurrent still applies on top).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_node: Option<u32>,
    /// Across the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<u32>,
}

/// restic retention rules, applied per volume identity (namespace + PVC), never across PVCs.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
    /// restic duration, e.g. "30d" or "1y6m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within_duration: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_tags: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupAction {
    /// 5-field cron, @hourly/@daily/@weekly/@monthly, or their -random variants.
    pub schedule: String,
    /// On PVC labels; absent selects every PVC in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckAction {
    pub schedule: String,
    /// restic --read-data-subset, e.g. "5%".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_data_subset: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PruneAction {
    pub schedule: String,
    pub retention: Retention,
}

/// Backs up, checks and prunes on schedules; each firing creates a run object owned by the Schedule.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "stowage.dev",
    version = "v1alpha1",
    kind = "Schedule",
    namespaced,
    status = "ScheduleStatus",
    shortname = "stsched",
    category = "stowage",
    printcolumn = r#"{"name":"Backup","type":"string","jsonPath":".spec.backup.schedule"}"#,
    printcolumn = r#"{"name":"Next backup","type":"string","jsonPath":".status.nextRuns.backup"}"#,
    printcolumn = r#"{"name":"Last success","type":"date","jsonPath":".status.lastSuccessTime"}"#,
    printcolumn = r#"{"name":"Paused","type":"boolean","jsonPath":".spec.paused"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    pub backend: BackendSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<PruneAction>,
    /// Stops firing; runs already started finish.
    #[serde(default)]
    pub paused: bool,
    /// Finished runs kept per action; older ones are deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_runs: Option<u32>,
}

/// A time per action (RFC 3339).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionTimes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The effective next fire time of each action (`-random` variants resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_runs: Option<ActionTimes>,
    /// The last fire time handled per action (run, skipped or missed); a restart resumes from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled: Option<ActionTimes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The repository's figures from the newest Check or Prune.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RepositoryFigures>,
}

/// A Schedule to inherit the backend from.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleRef {
    pub name: String,
}

/// One backup run, created by a Schedule or by hand.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "stowage.dev",
    version = "v1alpha1",
    kind = "Backup",
    namespaced,
    status = "RunStatus",
    shortname = "stbackup",
    category = "stowage",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Volumes","type":"string","jsonPath":".status.summary"}"#,
    printcolumn = r#"{"name":"Started","type":"date","jsonPath":".status.startTime"}"#,
    printcolumn = r#"{"name":"Completed","type":"date","jsonPath":".status.completionTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// The repository; or `scheduleRef` to inherit it (and the selector and concurrency, unless
    /// set here). A Schedule fills every field of the runs it fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_ref: Option<ScheduleRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
}

/// A helper pod with the tools for a dump (e.g. `mysqldump` against a database service): for each
/// Backup run in its namespace the coordinator starts it, the agent of its node streams
/// `backupCommand`'s stdout into a snapshot, and the pod is deleted.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "stowage.dev",
    version = "v1alpha1",
    kind = "PreBackupPod",
    namespaced,
    shortname = "stprebackup",
    category = "stowage",
    printcolumn = r#"{"name":"Command","type":"string","jsonPath":".spec.backupCommand"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PreBackupPodSpec {
    /// A shell command line run in the pod's first container; its stdout is the backup.
    pub backup_command: String,
    /// The extension of the file in the snapshot, e.g. `.sql`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_extension: Option<String>,
    /// The command's time limit (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// The pod to run: a PodTemplateSpec. Its first container should keep running (e.g.
    /// `sleep infinity`) until the command is done. Not expanded in the CRD's schema (which would
    /// grow by half a megabyte): the API server validates it as a pod when the pod is created.
    #[schemars(schema_with = "pod_template_schema")]
    pub pod: k8s_openapi::api::core::v1::PodTemplateSpec,
}

fn pod_template_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "A PodTemplateSpec (metadata and spec of the pod to run).",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// One `restic check` of a repository, run on one ready agent.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "stowage.dev",
    version = "v1alpha1",
    kind = "Check",
    namespaced,
    status = "RunStatus",
    shortname = "stcheck",
    category = "stowage",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Started","type":"date","jsonPath":".status.startTime"}"#,
    printcolumn = r#"{"name":"Completed","type":"date","jsonPath":".status.completionTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CheckSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_ref: Option<ScheduleRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_data_subset: Option<String>,
}

/// Applies retention per volume identity, then prunes unreferenced data; run on one ready agent.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "stowage.dev",
    version = "v1alpha1",
    kind = "Prune",
    namespaced,
    status = "RunStatus",
    shortname = "stprune",
    category = "stowage",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Started","type":"date","jsonPath":".status.startTime"}"#,
    printcolumn = r#"{"name":"Completed","type":"date","jsonPath":".status.completionTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PruneSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_ref: Option<ScheduleRef>,
    /// Defaults to the Schedule's retention when `scheduleRef` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Report per volume identity what would be kept and removed; delete nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// Writes a snapshot back where the data lives: the agent on the node that mounts the target
/// volume restores into it while its pods keep running (an unmounted PVC gets a mount-holder pod).
/// A backup command's snapshot is streamed into the target pod's `stowage.dev/restore-command`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "stowage.dev",
    version = "v1alpha1",
    kind = "Restore",
    namespaced,
    status = "RunStatus",
    shortname = "strestore",
    category = "stowage",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Snapshot","type":"string","jsonPath":".status.restore.snapshotId"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.restore.node"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.summary"}"#,
    printcolumn = r#"{"name":"Completed","type":"date","jsonPath":".status.completionTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// The repository; or `scheduleRef` to use a Schedule's. A restore never creates a repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_ref: Option<ScheduleRef>,
    pub source: RestoreSource,
    #[serde(default)]
    pub target: RestoreTarget,
}

/// Whose snapshot, and which one.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSource {
    /// The PVC whose snapshots to read (of `namespace`). Set this or `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<String>,
    /// A backup command's history, as its Backup item names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandSourceRef>,
    /// Whose namespace's snapshots: this Restore's own unless the coordinator runs with
    /// `--allow-cross-namespace-restore`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `latest` (the default) or a snapshot id (at least 8 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The newest snapshot taken at or before this RFC 3339 time (instead of `snapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// Paths inside the volume to restore (e.g. `/pgdata/base`); empty restores everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Let `latest` and `before` choose a partial snapshot (a backup that could not read every
    /// file, tagged `stowage.dev/partial=true`). Off by default: a partial snapshot lacks files, and
    /// a Replace restore of it would delete them from the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_partial: Option<bool>,
}

/// A backup command's history: `<Kind>/<name>` of the pod's owner and the container.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandSourceRef {
    /// e.g. `StatefulSet/pg`, `Deployment/web`, `Pod/tools`.
    pub owner: String,
    /// Default: the target pod's `stowage.dev/backup-container`, else its first container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// Where to write.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTarget {
    /// A PVC of this namespace; default: `source.pvc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<String>,
    /// A subdirectory inside the target volume (created if missing); default: its root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RestoreMode>,
    /// Command restores: the pod whose `stowage.dev/restore-command` receives the dump. Default:
    /// the oldest ready pod of the source's owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestoreMode {
    /// Write the snapshot's files over the target; leave other files alone.
    #[default]
    Merge,
    /// Make the target equal to the snapshot (within `include`): files the snapshot does not have
    /// are removed. Swapped in only after the whole snapshot is restored into staging.
    Replace,
    /// Refuse unless the target (or `path`) is empty; nothing is written then.
    IntoEmpty,
}

/// What a Restore did (or is doing).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreOutcome {
    /// The resolved snapshot's full id, written before anything is written to the volume. A
    /// Restore resumed after a coordinator restart restores exactly this snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_time: Option<String>,
    /// Whether the snapshot is partial (its backup could not read every file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<bool>,
    /// Where it was written: node, pod (a mount holder for an unmounted PVC), PVC and path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RestoreMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_done: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_restored: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirs_restored: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_restored: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// A command restore: what ran and how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandItem>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RunPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    /// Some items failed; never reported as Succeeded.
    PartiallyFailed,
    Failed,
    /// Items only: nothing to back up and nothing wrong (see the item's `reason`, e.g.
    /// `EmptyVolume`). Not a failure: a run whose other items succeeded is Succeeded.
    Skipped,
}

impl RunPhase {
    /// An item that ended well: backed up, or skipped for a reason that is not a failure.
    pub fn is_fine(self) -> bool {
        matches!(self, RunPhase::Succeeded | RunPhase::Skipped)
    }
}

/// One volume (or, later, one backup command) of a run.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ItemStatus {
    pub namespace: String,
    pub pvc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub phase: RunPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_new: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_changed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_unmodified: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_added: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// Prune: snapshots kept and removed for this volume identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<u32>,
    /// Prune: short ids of the snapshots kept, and removed (dry run: that would be removed); at
    /// most 50 each, the counts above are exact.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_snapshots: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_snapshots: Vec<String>,
    /// While it waits: why ("waiting for the repository lock held by ...").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// While running: restic's percent done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_done: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why a Skipped item was skipped (`EmptyVolume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A backup command's item (then `pvc` is empty): what ran, and how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandItem>,
    /// The pre- and post-backup hooks of the pod whose volume this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<HookOutcomes>,
}

impl ItemStatus {
    /// What the item is, unique within a run: the PVC, or `command <owner>/<container>`.
    pub fn name(&self) -> String {
        match &self.command {
            Some(c) => format!("command {}/{}", c.owner, c.container),
            None => self.pvc.clone(),
        }
    }
}

/// A backup command's item.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandItem {
    /// `<Kind>/<name>` of the pod's owner (the command's identity), e.g. `StatefulSet/pg`.
    pub owner: String,
    pub container: String,
    /// The command line, as annotated.
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Bytes the command wrote to stdout (the snapshot's one file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_bytes: Option<u64>,
}

/// How a pod's hooks ended.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HookOutcomes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre: Option<HookOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post: Option<HookOutcome>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HookOutcome {
    /// -1 when there is none (timed out, stream broken, could not start).
    pub exit_code: i32,
    pub duration_seconds: f64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a run works with, complete. A Schedule writes it into the spec of the runs it fires; a
/// hand-made run that names a Schedule (`spec.scheduleRef`) resolves it once, when it starts, into
/// `status.resolved`. Either way, editing the Schedule later changes no run that already exists.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedSpec {
    /// The Schedule the values came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// With `initialize` decided (true or false), as it was when the run fired or started.
    pub backend: BackendSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_data_subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RunPhase>,
    /// For a run with `spec.scheduleRef` and no `spec.backend`: what it resolved when it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<ResolvedSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// "3/4 succeeded" for humans (a printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<ItemStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Check and Prune, while waiting: why ("waiting for the repository lock held by ...").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Prune: what restic freed (0 in a dry run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freed_bytes: Option<u64>,
    /// Check and Prune: the repository afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RepositoryFigures>,
    /// Restore: the snapshot, where it went, and how much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreOutcome>,
}

/// A repository's size, as restic reports it (`restic stats --mode raw-data`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryFigures {
    pub snapshots: u64,
    pub size_bytes: u64,
    /// When they were read (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// Where the chart keeps the CRDs.
pub fn chart_crd_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .unwrap_or(manifest)
        .join("deploy/daemonset/crds")
}

/// Every CRD as (file name, YAML).
pub fn rendered() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    [
        Schedule::crd(),
        Backup::crd(),
        Check::crd(),
        Prune::crd(),
        Restore::crd(),
        PreBackupPod::crd(),
    ]
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_yaml::to_string(&crd)?;
            Ok((format!("{name}.yaml"), format!("# Generated by `cargo run -p stowage-coordinator --bin crdgen`; do not edit.\n{yaml}")))
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum CrdGenError {
    #[error("rendering CRDs: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Writes every CRD into `dir`; returns the paths.
pub fn write_all(dir: &Path) -> Result<Vec<PathBuf>, CrdGenError> {
    std::fs::create_dir_all(dir).map_err(|source| CrdGenError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let mut out = Vec::new();
    for (file, yaml) in rendered()? {
        let path = dir.join(file);
        std::fs::write(&path, yaml).map_err(|source| CrdGenError::Write {
            path: path.display().to_string(),
            source,
        })?;
        out.push(path);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI fails when the chart's CRDs differ from the types: run crdgen and commit the result.
    #[test]
    fn checked_in_crds_match_the_types() {
        for (file, yaml) in rendered().unwrap() {
            let path = chart_crd_dir().join(&file);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == yaml,
                "{} is out of date: run `cargo run -p stowage-coordinator --bin crdgen` and commit it",
                path.display()
            );
        }
    }

    #[test]
    fn the_issue_example_deserializes() {
        let path = chart_crd_dir()
            .with_file_name("examples")
            .join("schedule.yaml");
        let s: Schedule = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let s3 = s.spec.backend.s3.as_ref().unwrap();
        assert_eq!(s3.access_key_id_secret_ref.key, "id");
        assert_eq!(
            s.spec
                .backup
                .as_ref()
                .unwrap()
                .concurrency
                .as_ref()
                .unwrap()
                .per_node,
            Some(2)
        );
        assert_eq!(
            s.spec.prune.as_ref().unwrap().retention.keep_weekly,
            Some(8)
        );
        let crds = rendered().unwrap();
        assert_eq!(crds.len(), 6);
        // Everything but PreBackupPod (a template, nothing to report) has a status subresource.
        assert!(
            crds.iter()
                .filter(|(f, _)| !f.starts_with("prebackuppods."))
                .all(|(_, y)| y.contains("subresources") && y.contains("status"))
        );
    }
}
