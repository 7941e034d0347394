//! The one writer of a run's status. A run's status is owned by a single task: volume tasks send it
//! updates over a channel, it writes what changed at most every `FLUSH_INTERVAL` (so a run's API
//! writes grow with its duration, not with its size), and it writes the final status when the run
//! ends. Every write is a server-side apply ([`crate::apply`]).

use std::time::Duration;

use kube::{Api, ResourceExt};
use tokio::sync::{mpsc, oneshot};

use crate::crd::{ItemStatus, RunPhase, RunStatus};
use crate::errors::{ITEM_ERROR_MAX, bounded};
use crate::runs::RunObject;

pub const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// A final write is retried this often before the run is left for the next leader to finish.
const FINAL_ATTEMPTS: u32 = 5;

/// The identity of an item within its run.
/// An item's namespace and [`ItemStatus::name`] (the PVC, or the command's identity).
pub type ItemKey = (String, String);

fn is(i: &ItemStatus, namespace: &str, name: &str) -> bool {
    i.namespace == namespace && i.name() == name
}

pub enum Update {
    /// An item's new state (replaces the item with the same namespace and PVC, or adds it).
    Item(Box<ItemStatus>),
    /// restic's progress of an item, in percent.
    Progress { key: ItemKey, percent: f64 },
    /// Why an item waits (`None`: it no longer does).
    Waiting {
        key: ItemKey,
        message: Option<String>,
    },
    /// Anything else about the run (phase, conditions, resolved spec).
    Run(Box<dyn FnOnce(&mut RunStatus) + Send>),
    /// Write now, and say whether it worked.
    Flush(oneshot::Sender<Result<(), kube::Error>>),
}

/// A handle to the writer task. Cloned into every volume task; the last drop ends the task.
#[derive(Clone)]
pub struct StatusHandle {
    tx: mpsc::UnboundedSender<Update>,
}

impl StatusHandle {
    pub fn item(&self, item: ItemStatus) {
        let _ = self.tx.send(Update::Item(Box::new(item)));
    }

    pub fn progress(&self, key: ItemKey, percent: f64) {
        let _ = self.tx.send(Update::Progress { key, percent });
    }

    pub fn waiting(&self, key: ItemKey, message: Option<String>) {
        let _ = self.tx.send(Update::Waiting { key, message });
    }

    pub fn run(&self, f: impl FnOnce(&mut RunStatus) + Send + 'static) {
        let _ = self.tx.send(Update::Run(Box::new(f)));
    }

    /// Writes everything sent so far.
    pub async fn flush(&self) -> Result<(), kube::Error> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Update::Flush(tx)).is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }
}

/// The writer task's side.
pub struct StatusWriter<K: RunObject> {
    api: Api<K>,
    name: String,
    status: RunStatus,
    dirty: bool,
}

/// Bounds what a status may hold: item errors are cut to `ITEM_ERROR_MAX`, so a run with thousands
/// of failing volumes still fits in one object.
pub fn bound(status: &mut RunStatus) {
    for i in &mut status.items {
        if let Some(e) = i.error.as_mut()
            && e.len() > ITEM_ERROR_MAX
        {
            *e = bounded(e, ITEM_ERROR_MAX);
        }
    }
    status.summary = Some(summary(&status.items));
}

impl<K: RunObject> StatusWriter<K> {
    /// Starts the writer for `run`, whose status is `status` (as read when the run began).
    pub fn spawn(
        client: kube::Client,
        run: &K,
        status: RunStatus,
    ) -> (StatusHandle, tokio::task::JoinHandle<RunStatus>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = StatusWriter::<K> {
            api: Api::namespaced(client, &run.namespace().unwrap_or_default()),
            name: run.name_any(),
            status,
            dirty: false,
        };
        (StatusHandle { tx }, tokio::spawn(writer.serve(rx)))
    }

    async fn serve(mut self, mut rx: mpsc::UnboundedReceiver<Update>) -> RunStatus {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                u = rx.recv() => match u {
                    Some(Update::Flush(done)) => {
                        let r = self.write().await;
                        let _ = done.send(r);
                    }
                    Some(u) => self.apply(u),
                    None => break,
                },
                _ = tick.tick() => {
                    if self.dirty && let Err(e) = self.write().await {
                        tracing::debug!(run = %self.name, error = %crate::errors::sentence(&e), "writing run status; retrying at the next interval");
                    }
                }
            }
        }
        // Every sender is gone: the run has ended. Its last state must land.
        for attempt in 1..=FINAL_ATTEMPTS {
            if !self.dirty {
                break;
            }
            match self.write().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(run = %self.name, attempt, error = %crate::errors::sentence(&e), "writing the final run status");
                    tokio::time::sleep(FLUSH_INTERVAL * attempt).await;
                }
            }
        }
        self.status
    }

    fn apply(&mut self, u: Update) {
        match u {
            Update::Item(item) => {
                let found = self
                    .status
                    .items
                    .iter_mut()
                    .find(|i| is(i, &item.namespace, &item.name()));
                match found {
                    Some(i) => *i = *item,
                    None => self.status.items.push(*item),
                }
            }
            Update::Progress { key: k, percent } => {
                if let Some(i) = self.status.items.iter_mut().find(|i| is(i, &k.0, &k.1)) {
                    i.percent_done = Some((percent * 1000.0).round() / 10.0);
                }
            }
            Update::Waiting { key: k, message } => {
                if let Some(i) = self.status.items.iter_mut().find(|i| is(i, &k.0, &k.1)) {
                    i.message = message;
                }
            }
            Update::Run(f) => f(&mut self.status),
            Update::Flush(_) => {}
        }
        self.dirty = true;
    }

    async fn write(&mut self) -> Result<(), kube::Error> {
        bound(&mut self.status);
        apply_status::<K>(&self.api, &self.name, &self.status, None).await?;
        self.dirty = false;
        Ok(())
    }
}

/// Server-side apply of a run's whole status. With `resource_version`, the write only succeeds on
/// exactly that version of the object (409 otherwise): how a run is claimed.
pub async fn apply_status<K: RunObject>(
    api: &Api<K>,
    name: &str,
    status: &RunStatus,
    resource_version: Option<&str>,
) -> Result<(), kube::Error> {
    crate::apply::status(api, name, status, resource_version).await
}

/// "3/4 succeeded", "1 running" for the printer column.
pub fn summary(items: &[ItemStatus]) -> String {
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

    #[test]
    fn a_thousand_long_errors_are_bounded() {
        let mut st = RunStatus {
            items: (0..1000)
                .map(|i| ItemStatus {
                    namespace: "ns".into(),
                    pvc: format!("data-{i}"),
                    phase: RunPhase::Failed,
                    error: Some("e".repeat(100_000)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        bound(&mut st);
        let size = serde_json::to_vec(&st).unwrap().len();
        assert!(size < 800_000, "{size} bytes");
        assert_eq!(st.summary.as_deref(), Some("0/1000 succeeded"));
        let item = ItemStatus {
            phase: RunPhase::Running,
            ..Default::default()
        };
        assert_eq!(summary(&[item]), "0/1 succeeded, 1 running");
    }
}
