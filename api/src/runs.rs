//! The run objects: `Backup`, `Check`, `Prune` and `Restore` (each one run, made by a Schedule or by
//! hand), and `PreBackupPod` (a helper pod a Backup starts for a dump).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::backend::BackendSpec;
use crate::schedule::{Concurrency, Retention, ScheduleRef};
use crate::status::RunStatus;

/// One backup run, created by a Schedule or by hand.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    crates(kube_core = "::kube_core"),
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
    crates(kube_core = "::kube_core"),
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
    crates(kube_core = "::kube_core"),
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
    crates(kube_core = "::kube_core"),
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

/// A verification drill: for each volume and backup command in scope, the newest complete snapshot
/// is restored (whole, or a rotating sample of `sampleBytes`) into scratch space on a node with
/// `restic restore --verify`, and removed; a command's dump is read through SHA-256. Drills run
/// below backups: a backup that queues on a node takes the drill's slot.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "stowage.dev",
    version = "v1alpha1",
    kind = "Verify",
    namespaced,
    status = "RunStatus",
    shortname = "stverify",
    category = "stowage",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Verified","type":"string","jsonPath":".status.summary"}"#,
    printcolumn = r#"{"name":"Started","type":"date","jsonPath":".status.startTime"}"#,
    printcolumn = r#"{"name":"Completed","type":"date","jsonPath":".status.completionTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VerifySpec {
    /// The repository; or `scheduleRef` to use a Schedule's (and its verify or backup selector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_ref: Option<ScheduleRef>,
    /// On PVC labels, as a Backup's; absent selects every PVC of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Restore at most this much of each volume's snapshot (a quantity: `1Gi`, `500Mi`), a window
    /// that moves on with every drill; absent restores whole snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_bytes: Option<String>,
}

/// Writes a snapshot back where the data lives: the agent on the node that mounts the target
/// volume restores into it while its pods keep running (an unmounted PVC gets a mount-holder pod).
/// A backup command's snapshot is streamed into the target pod's `stowage.dev/restore-command`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    crates(kube_core = "::kube_core"),
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
    /// Write nothing: resolve the snapshot as a restore would, compare it with the target volume
    /// (read-only, on its node) and report in `status.restore.preview` what the restore would
    /// add, change and (for Replace) delete. Volume restores only (`source.pvc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
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
