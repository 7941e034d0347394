//! The one writer of a run's status. A run's status is owned by a single task: volume tasks send it
//! updates over a channel, it writes what changed at most every `FLUSH_INTERVAL` (so a run's API
//! writes grow with its duration, not with its size), and it writes the final status when the run
//! ends. Every write is a server-side apply ([`crate::apply`]).

use std::time::Duration;

use kube::{Api, ResourceExt};
use tokio::sync::{mpsc, oneshot};

use crate::errors::{ITEM_ERROR_MAX, bounded};
use crate::runs::RunObject;
#[cfg(test)]
use stowage_api::CommandItem;
use stowage_api::{ItemStatus, RunPhase, RunStatus};

pub const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// A status larger than this (as JSON) is shortened before it is written: etcd keeps at most
/// 1.5 MiB per object, and the run's spec and metadata need room too.
pub const STATUS_BUDGET: usize = 1024 * 1024;
/// Free text per item once a status had to be shortened.
const SHORT_TEXT: usize = 128;
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

/// Bounds what a status may hold: item errors are cut to `ITEM_ERROR_MAX`, and a status still
/// larger than [`STATUS_BUDGET`] is shortened (see [`fit`]), so a run of the most items a run may
/// have, each with the longest names a tenant can give, still fits in one object.
pub fn bound(status: &mut RunStatus) {
    for i in &mut status.items {
        if let Some(e) = i.error.as_mut()
            && e.len() > ITEM_ERROR_MAX
        {
            *e = bounded(e, ITEM_ERROR_MAX);
        }
    }
    let shortened = !fits(status, STATUS_BUDGET);
    if shortened {
        fit(status, STATUS_BUDGET);
    }
    let mut s = summary(&status.items);
    if shortened {
        s.push_str(" (item details shortened to fit the status)");
    }
    status.summary = Some(s);
}

fn fits(status: &RunStatus, budget: usize) -> bool {
    serde_json::to_vec(status).is_ok_and(|v| v.len() <= budget)
}

fn shorten(text: &mut Option<String>, max: usize) {
    if let Some(t) = text.as_mut()
        && t.len() > max
    {
        *t = bounded(t, max);
    }
}

/// Shortens what people read, in steps, until the status fits `budget` bytes. Each item keeps its
/// identity, phase, snapshot id and counts: nothing says an item succeeded that did not, and no
/// item disappears. First every free text is cut to [`SHORT_TEXT`] bytes and the snapshot lists to
/// ten; then items that succeeded lose their free text, pod, node and hooks; then every item does,
/// keeping a shorter error; last, the errors go too (the Events and the log still have them).
fn fit(status: &mut RunStatus, budget: usize) {
    for i in &mut status.items {
        shorten(&mut i.error, SHORT_TEXT);
        shorten(&mut i.message, SHORT_TEXT);
        shorten(&mut i.reason, SHORT_TEXT);
        if let Some(c) = i.command.as_mut() {
            c.command = bounded(&c.command, SHORT_TEXT / 2);
        }
        if let Some(h) = i.hooks.as_mut() {
            for o in [h.pre.as_mut(), h.post.as_mut()].into_iter().flatten() {
                shorten(&mut o.error, SHORT_TEXT);
            }
        }
        i.kept_snapshots.truncate(10);
        i.removed_snapshots.truncate(10);
        // A drill's window, named by a tenant's paths (the next window then starts at most a few
        // files early).
        if let Some(v) = i.verification.as_mut() {
            shorten(&mut v.first, SHORT_TEXT);
            shorten(&mut v.last, SHORT_TEXT);
        }
    }
    if fits(status, budget) {
        return;
    }
    for i in &mut status.items {
        i.kept_snapshots.clear();
        i.removed_snapshots.clear();
        if i.phase.is_fine() {
            i.error = None;
            i.message = None;
            i.hooks = None;
            i.pod = None;
            i.node = None;
        }
    }
    if fits(status, budget) {
        return;
    }
    // Then every item: its identity, phase, snapshot and counts, and a shorter error.
    for i in &mut status.items {
        i.message = None;
        i.hooks = None;
        i.pod = None;
        i.node = None;
        shorten(&mut i.error, SHORT_TEXT / 2);
        if let Some(c) = i.command.as_mut() {
            c.command.clear();
        }
    }
    if fits(status, budget) {
        return;
    }
    for i in &mut status.items {
        i.error = None;
    }
}

/// Whether a failed write was refused for the object's size (etcd's limit, or the API server's
/// request limit): writing the same status again cannot succeed.
pub fn too_large(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => {
            s.code == 413
                || s.message.contains("too large")
                || s.message.contains("Request entity too large")
        }
        _ => false,
    }
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
                Err(e) if too_large(&e) => {
                    // Never resumed to run its commands again, never left Running: it fails,
                    // once, saying why; its items stay in the log.
                    self.fail_unrecorded(&e).await;
                    break;
                }
                Err(e) => {
                    tracing::warn!(run = %self.name, attempt, error = %crate::errors::sentence(&e), "writing the final run status");
                    tokio::time::sleep(FLUSH_INTERVAL * attempt).await;
                }
            }
        }
        self.status
    }

    /// The status without its items, Failed, with a condition that says why: what is left when the
    /// whole status cannot be stored.
    async fn fail_unrecorded(&mut self, e: &kube::Error) {
        let why = crate::errors::sentence(e);
        tracing::error!(run = %self.name, error = %why, summary = %summary(&self.status.items),
            "the run's status is too large to store; recording it as failed without its items");
        let mut minimal = RunStatus {
            phase: Some(RunPhase::Failed),
            start_time: self.status.start_time.clone(),
            completion_time: self.status.completion_time.clone(),
            summary: Some(bounded(
                &format!("{} (items not recorded)", summary(&self.status.items)),
                crate::errors::ITEM_ERROR_MAX,
            )),
            resolved: self.status.resolved.clone(),
            ..Default::default()
        };
        crate::conditions::set(
            &mut minimal.conditions,
            crate::conditions::SUCCEEDED,
            false,
            "StatusNotRecorded",
            &bounded(
                &format!(
                    "the run's status could not be stored ({why}), so its items are not recorded; the snapshots it made are in the repository (kubectl stowage snapshots)"
                ),
                crate::errors::CONDITION_MESSAGE_MAX,
            ),
            None,
        );
        match apply_status::<K>(&self.api, &self.name, &minimal, None).await {
            Ok(()) => {
                self.status = minimal;
                self.dirty = false;
            }
            Err(e) => tracing::warn!(run = %self.name, error = %crate::errors::sentence(&e),
                "writing even the shortened status failed; the next leader resumes the run"),
        }
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

    /// The most items a run may have, each with the longest names and texts a tenant can give:
    /// shortened to fit, every item still there with its phase and snapshot.
    /// A Verify run of the most items, each with the longest names and sample paths a tenant can
    /// give: shortened to fit, every item still there with its snapshot and counts.
    #[test]
    fn a_largest_verify_run_with_hostile_paths_fits_its_budget() {
        let long = |c: char, n: usize| std::iter::repeat_n(c, n).collect::<String>();
        let mut st = RunStatus {
            items: (0..crate::run::backup::MAX_RUN_ITEMS)
                .map(|i| ItemStatus {
                    namespace: long('n', 63),
                    pvc: format!("{}{i:04}", long('p', 249)),
                    node: Some(long('d', 253)),
                    phase: RunPhase::Succeeded,
                    snapshot_id: Some(long('a', 64)),
                    duration_seconds: Some(1.5),
                    verification: Some(stowage_api::Verification {
                        snapshot_time: Some(long('t', 35)),
                        files: 10_000,
                        bytes: 1 << 30,
                        first: Some(long('f', 512)),
                        last: Some(long('l', 512)),
                        snapshot_files: Some(1_000_000),
                        skipped_files: Some(3),
                        sha256: Some(long('h', 64)),
                        yielded: Some(2),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        bound(&mut st);
        let size = serde_json::to_vec(&st).unwrap().len();
        assert!(size <= STATUS_BUDGET, "{size} bytes");
        assert_eq!(st.items.len(), crate::run::backup::MAX_RUN_ITEMS);
        assert!(st.items.iter().all(|i| {
            i.snapshot_id.is_some() && i.verification.as_ref().is_some_and(|v| v.files == 10_000)
        }));
    }

    #[test]
    fn a_largest_run_with_hostile_names_fits_its_budget() {
        let long = |c: char, n: usize| std::iter::repeat_n(c, n).collect::<String>();
        let mut st = RunStatus {
            items: (0..crate::run::backup::MAX_RUN_ITEMS)
                .map(|i| ItemStatus {
                    namespace: long('n', 63),
                    pvc: format!("{}{i:04}", long('p', 249)),
                    pod: Some(long('o', 253)),
                    node: Some(long('d', 253)),
                    phase: if i % 2 == 0 {
                        RunPhase::Succeeded
                    } else {
                        RunPhase::Failed
                    },
                    snapshot_id: Some(format!("{i:08x}")),
                    error: Some(long('e', 100_000)),
                    message: Some(long('m', 4000)),
                    command: Some(CommandItem {
                        owner: long('w', 300),
                        container: long('c', 63),
                        command: long('x', 256),
                        ..Default::default()
                    }),
                    kept_snapshots: vec![long('k', 8); 50],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        bound(&mut st);
        let size = serde_json::to_vec(&st).unwrap().len();
        assert!(size <= STATUS_BUDGET, "{size} bytes");
        assert_eq!(st.items.len(), crate::run::backup::MAX_RUN_ITEMS);
        assert!(st.items.iter().all(|i| i.snapshot_id.is_some()));
        assert_eq!(
            st.summary.as_deref(),
            Some("500/1000 succeeded (item details shortened to fit the status)")
        );
        assert!(
            st.items
                .iter()
                .all(|i| i.pvc.len() == 253 && i.namespace.len() == 63)
        );
    }

    #[test]
    fn a_refusal_for_size_is_told_from_a_passing_failure() {
        let api = |code: u16, reason: &str, message: &str| {
            kube::Error::Api(Box::new(
                serde_json::from_value(serde_json::json!({
                    "status": "Failure", "code": code, "reason": reason, "message": message
                }))
                .unwrap(),
            ))
        };
        // As the API server answers a status of several MiB.
        assert!(too_large(&api(
            413,
            "RequestEntityTooLarge",
            "Request entity too large: limit is 3145728"
        )));
        assert!(too_large(&api(
            500,
            "InternalError",
            "etcdserver: request is too large"
        )));
        assert!(!too_large(&api(
            409,
            "Conflict",
            "the object has been modified"
        )));
    }

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
