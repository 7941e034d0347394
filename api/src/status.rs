//! What a run reports: its phase, one item per volume or command, and its outcome.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::backend::BackendSpec;
use crate::runs::RestoreMode;
use crate::schedule::{Concurrency, Retention};

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
    /// A dry run's findings (`spec.dryRun`); nothing was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<RestorePreview>,
}

/// What a restore would do to its target (`spec.dryRun`), from comparing the snapshot with it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestorePreview {
    /// Entries the target lacks: the restore writes them.
    pub added: PreviewSet,
    /// Files whose content differs: the restore overwrites them.
    pub changed: PreviewSet,
    /// Entries only the target has: a Replace removes them (always empty for other modes).
    pub deleted: PreviewSet,
    /// Entries already as in the snapshot (existing directories and symlinks included).
    pub unchanged: u64,
}

/// One kind of change in a preview: how many entries, their bytes, and the first paths.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreviewSet {
    pub entries: u64,
    pub bytes: u64,
    /// The first paths (relative to the restore's target), at most 100; `entries` counts all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
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
    /// Verify: what the drill read back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

/// What one drill read back from one identity's snapshot (`snapshotId` of the item).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_time: Option<String>,
    /// Files restored and verified (a command: 1, its dump) and their bytes.
    pub files: u64,
    pub bytes: u64,
    /// The whole snapshot was read (no sample bound, or everything fitted).
    #[serde(default)]
    pub complete: bool,
    /// The first and last file of the sample, in the snapshot's order; the next drill starts
    /// after `last`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
    /// The sample reached the snapshot's end and went on from its start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wrapped: bool,
    /// Regular files in the snapshot, and those no sample can take (larger than the bound, or
    /// named in a way restic's include patterns cannot express).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_files: Option<u64>,
    /// A command's dump: its SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Times the drill gave its slot to a backup and started over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yielded: Option<u32>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_bytes: Option<String>,
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
    /// When the key the repository password opens was created (RFC 3339), from `restic key list`:
    /// what `stowage_repository_key_age_seconds` and the key-age alert watch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_created: Option<String>,
    /// When they were read (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}
