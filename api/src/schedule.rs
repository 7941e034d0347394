//! `Schedule`: what to back up, check and prune, and when; and the settings its actions share
//! with the runs they create.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::backend::BackendSpec;
use crate::status::RepositoryFigures;

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

/// Verification drills ([`crate::Verify`]) on a schedule.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifyAction {
    /// e.g. `@weekly-random`.
    pub schedule: String,
    /// Restore at most this much of each volume's newest snapshot per drill (`1Gi`); the sample
    /// rotates. Absent: whole snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_bytes: Option<String>,
    /// Default: the backup action's selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// Backs up, checks and prunes on schedules; each firing creates a run object owned by the Schedule.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    crates(kube_core = "::kube_core"),
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyAction>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
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
