//! What Backup, Check and Prune runs have in common: their status, the labels tying them to a
//! Schedule, and a status writer that keeps the API object current while a run executes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::{BackendSpec, Backup, Check, ItemStatus, Prune, RunPhase, RunStatus, ScheduleRef};

pub const LABEL_SCHEDULE: &str = "stowage.dev/schedule";
pub const LABEL_ACTION: &str = "stowage.dev/action";

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
}

impl RunObject for Backup {
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

/// Holds a run's status and writes it to the API: at once for what matters (an item finished,
/// the phase changed), and at most every `PROGRESS_INTERVAL` for progress.
pub struct StatusWriter<K: RunObject> {
    api: Api<K>,
    name: String,
    status: Mutex<RunStatus>,
    /// Serialises writes so an older snapshot can never land after a newer one.
    write: tokio::sync::Mutex<()>,
    dirty: std::sync::atomic::AtomicBool,
}

pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

impl<K: RunObject> StatusWriter<K> {
    pub fn new(client: kube::Client, run: &K) -> Arc<Self> {
        let ns = run.namespace().unwrap_or_default();
        Arc::new(Self {
            api: Api::namespaced(client, &ns),
            name: run.name_any(),
            status: Mutex::new(run.run_status().cloned().unwrap_or_default()),
            write: tokio::sync::Mutex::new(()),
            dirty: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn snapshot(&self) -> RunStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Changes the status in memory; `flush` or the progress ticker writes it.
    pub fn update(&self, f: impl FnOnce(&mut RunStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
            s.summary = Some(summary(&s.items));
        }
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Writes the current status now.
    pub async fn flush(&self) -> Result<(), kube::Error> {
        let _guard = self.write.lock().await;
        self.dirty
            .store(false, std::sync::atomic::Ordering::Release);
        let status = self.snapshot();
        let patch = serde_json::json!({ "status": status });
        self.api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
    }

    /// Writes progress changes every `PROGRESS_INTERVAL` until dropped (abort the task).
    pub fn progress_ticker(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROGRESS_INTERVAL).await;
                if me.dirty.load(std::sync::atomic::Ordering::Acquire)
                    && let Err(e) = me.flush().await
                {
                    tracing::debug!(run = %me.name, error = %e, "writing progress");
                }
            }
        })
    }
}

/// "3/4 succeeded", "1 running" for the printer column.
fn summary(items: &[ItemStatus]) -> String {
    let total = items.len();
    let ok = items
        .iter()
        .filter(|i| i.phase == RunPhase::Succeeded)
        .count();
    let running = items
        .iter()
        .filter(|i| i.phase == RunPhase::Running)
        .count();
    if running > 0 {
        format!("{ok}/{total} succeeded, {running} running")
    } else {
        format!("{ok}/{total} succeeded")
    }
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
        assert_eq!(
            summary(&[item(RunPhase::Succeeded), item(RunPhase::Running)]),
            "1/2 succeeded, 1 running"
        );
    }
}
