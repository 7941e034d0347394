//! What Backup, Check and Prune runs have in common: their status, the labels tying them to a
//! Schedule, and how each kind completes its spec from a Schedule.

use chrono::Utc;
use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::RunStores;
use stowage_api::{
    BackendSpec, Backup, Check, ItemStatus, Prune, ResolvedSpec, Restore, RunPhase, RunStatus,
    Schedule, ScheduleRef, Verify,
};

pub use stowage_api::contract::{LABEL_ACTION, LABEL_SCHEDULE};

/// A run kind.
pub trait RunObject:
    Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// `backup`, `check` or `prune`: the metric label and the Schedule action.
    const ACTION: &'static str;
    fn run_status(&self) -> Option<&RunStatus>;
    /// The run's own repository, if it names one.
    fn backend(&self) -> Option<&BackendSpec>;
    /// The Schedule whose repository (and defaults) the run uses otherwise.
    fn schedule_ref(&self) -> Option<&ScheduleRef>;
    /// The run's complete spec: its own fields, the rest from `schedule`.
    fn resolve_with(&self, schedule: Option<&Schedule>) -> ResolvedSpec;
    /// The watch cache of this kind.
    fn store(runs: &RunStores) -> &crate::state::Cache<Self>;
}

/// The repository of a run: its own, or its Schedule's with `initialize` decided. A Schedule that
/// never backed up successfully may create its repository; once it has a history, a missing
/// repository is a mistake in the location, never a reason to start anew.
fn backend_of(own: Option<&BackendSpec>, schedule: Option<&Schedule>) -> ResolvedSpec {
    let backend = match (own, schedule) {
        (Some(b), _) => b.clone(),
        (None, Some(s)) => {
            let mut b = s.spec.backend.clone();
            b.initialize = Some(b.initialize.unwrap_or_else(|| never_succeeded(s)));
            b
        }
        (None, None) => BackendSpec::default(),
    };
    ResolvedSpec {
        schedule: schedule.map(kube::ResourceExt::name_any),
        backend,
        ..Default::default()
    }
}

/// Whether a Schedule has never had a successful backup (its first runs may create the repository).
pub fn never_succeeded(s: &Schedule) -> bool {
    s.status
        .as_ref()
        .is_none_or(|st| st.last_success_time.is_none())
}

impl RunObject for Backup {
    fn store(runs: &RunStores) -> &crate::state::Cache<Self> {
        &runs.backups
    }
    fn resolve_with(&self, schedule: Option<&Schedule>) -> ResolvedSpec {
        let from = schedule.and_then(|s| s.spec.backup.as_ref());
        ResolvedSpec {
            selector: self
                .spec
                .selector
                .clone()
                .or_else(|| from.and_then(|b| b.selector.clone())),
            concurrency: self
                .spec
                .concurrency
                .clone()
                .or_else(|| from.and_then(|b| b.concurrency.clone())),
            ..backend_of(self.spec.backend.as_ref(), schedule)
        }
    }
    fn backend(&self) -> Option<&BackendSpec> {
        self.spec.backend.as_ref()
    }
    fn schedule_ref(&self) -> Option<&ScheduleRef> {
        self.spec.schedule_ref.as_ref()
    }
    const ACTION: &'static str = "backup";
    fn run_status(&self) -> Option<&RunStatus> {
        self.status.as_ref()
    }
}

impl RunObject for Check {
    fn store(runs: &RunStores) -> &crate::state::Cache<Self> {
        &runs.checks
    }
    fn resolve_with(&self, schedule: Option<&Schedule>) -> ResolvedSpec {
        ResolvedSpec {
            read_data_subset: self.spec.read_data_subset.clone().or_else(|| {
                schedule
                    .and_then(|s| s.spec.check.as_ref())
                    .and_then(|c| c.read_data_subset.clone())
            }),
            ..backend_of(self.spec.backend.as_ref(), schedule)
        }
    }
    fn backend(&self) -> Option<&BackendSpec> {
        self.spec.backend.as_ref()
    }
    fn schedule_ref(&self) -> Option<&ScheduleRef> {
        self.spec.schedule_ref.as_ref()
    }
    const ACTION: &'static str = "check";
    fn run_status(&self) -> Option<&RunStatus> {
        self.status.as_ref()
    }
}

impl RunObject for Prune {
    fn store(runs: &RunStores) -> &crate::state::Cache<Self> {
        &runs.prunes
    }
    fn resolve_with(&self, schedule: Option<&Schedule>) -> ResolvedSpec {
        ResolvedSpec {
            retention: self.spec.retention.clone().or_else(|| {
                schedule
                    .and_then(|s| s.spec.prune.as_ref())
                    .map(|p| p.retention.clone())
            }),
            ..backend_of(self.spec.backend.as_ref(), schedule)
        }
    }
    fn backend(&self) -> Option<&BackendSpec> {
        self.spec.backend.as_ref()
    }
    fn schedule_ref(&self) -> Option<&ScheduleRef> {
        self.spec.schedule_ref.as_ref()
    }
    const ACTION: &'static str = "prune";
    fn run_status(&self) -> Option<&RunStatus> {
        self.status.as_ref()
    }
}

impl RunObject for Verify {
    fn store(runs: &RunStores) -> &crate::state::Cache<Self> {
        &runs.verifies
    }
    fn resolve_with(&self, schedule: Option<&Schedule>) -> ResolvedSpec {
        let action = schedule.and_then(|s| s.spec.verify.as_ref());
        let mut spec = ResolvedSpec {
            // Default: what the Schedule backs up.
            selector: self.spec.selector.clone().or_else(|| {
                action.and_then(|v| v.selector.clone()).or_else(|| {
                    schedule
                        .and_then(|s| s.spec.backup.as_ref())
                        .and_then(|b| b.selector.clone())
                })
            }),
            sample_bytes: self
                .spec
                .sample_bytes
                .clone()
                .or_else(|| action.and_then(|v| v.sample_bytes.clone())),
            ..backend_of(self.spec.backend.as_ref(), schedule)
        };
        // A drill reads an existing repository; a missing one is a mistake, never a new start.
        spec.backend.initialize = Some(false);
        spec
    }
    fn backend(&self) -> Option<&BackendSpec> {
        self.spec.backend.as_ref()
    }
    fn schedule_ref(&self) -> Option<&ScheduleRef> {
        self.spec.schedule_ref.as_ref()
    }
    const ACTION: &'static str = "verify";
    fn run_status(&self) -> Option<&RunStatus> {
        self.status.as_ref()
    }
}

impl RunObject for Restore {
    fn store(runs: &RunStores) -> &crate::state::Cache<Self> {
        &runs.restores
    }
    fn resolve_with(&self, schedule: Option<&Schedule>) -> ResolvedSpec {
        let mut spec = backend_of(self.spec.backend.as_ref(), schedule);
        // A restore reads an existing repository; a missing one is a mistake, never a new start.
        spec.backend.initialize = Some(false);
        spec
    }
    fn backend(&self) -> Option<&BackendSpec> {
        self.spec.backend.as_ref()
    }
    fn schedule_ref(&self) -> Option<&ScheduleRef> {
        self.spec.schedule_ref.as_ref()
    }
    const ACTION: &'static str = "restore";
    fn run_status(&self) -> Option<&RunStatus> {
        self.status.as_ref()
    }
}

pub fn is_terminal(phase: Option<RunPhase>) -> bool {
    matches!(
        phase,
        Some(RunPhase::Succeeded | RunPhase::PartiallyFailed | RunPhase::Failed)
    )
}

pub fn phase_label(phase: RunPhase) -> &'static str {
    match phase {
        RunPhase::Pending => "pending",
        RunPhase::Running => "running",
        RunPhase::Succeeded => "succeeded",
        RunPhase::PartiallyFailed => "partially_failed",
        RunPhase::Failed => "failed",
        RunPhase::Skipped => "skipped",
    }
}

/// The run's phase from its items: Succeeded only when every item succeeded; PartiallyFailed when
/// at least one item produced a snapshot.
pub fn phase_of(items: &[ItemStatus]) -> RunPhase {
    let ok = items.iter().filter(|i| i.phase.is_fine()).count();
    let some = items
        .iter()
        .any(|i| matches!(i.phase, RunPhase::Succeeded | RunPhase::PartiallyFailed));
    if !items.is_empty() && ok == items.len() {
        RunPhase::Succeeded
    } else if some {
        RunPhase::PartiallyFailed
    } else {
        RunPhase::Failed
    }
}

pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(phase: RunPhase) -> ItemStatus {
        ItemStatus {
            phase,
            ..Default::default()
        }
    }

    #[test]
    fn succeeded_only_when_every_item_succeeded() {
        assert_eq!(
            phase_of(&[]),
            RunPhase::Failed,
            "nothing backed up is not a success"
        );
        assert_eq!(phase_of(&[item(RunPhase::Succeeded)]), RunPhase::Succeeded);
        assert_eq!(
            phase_of(&[item(RunPhase::Succeeded), item(RunPhase::PartiallyFailed)]),
            RunPhase::PartiallyFailed
        );
        assert_eq!(
            phase_of(&[item(RunPhase::Failed), item(RunPhase::PartiallyFailed)]),
            RunPhase::PartiallyFailed,
            "a partial snapshot is something, but not a success"
        );
        assert_eq!(phase_of(&[item(RunPhase::Failed)]), RunPhase::Failed);
    }
}
