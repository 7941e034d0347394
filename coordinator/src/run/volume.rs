//! One volume of a Backup run, as one unit of work: it waits for its slots, gets the volume mounted
//! if no pod mounts it, asks the node's agent to back it up, and always ends in an item outcome,
//! whatever fails on the way (agent deadlines and stalls arrive as the agent's errors).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use stowage_proto::v1::{self as pb, BackupResult, Outcome};
use tokio::sync::Semaphore;

use super::hooks::PodHooks;
use super::status::StatusHandle;
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::dispatch::{self, TAG_PARTIAL, VolumeJob};
use crate::mount_holder;
use stowage_api::{Backup, Concurrency, ItemStatus, RunPhase};

/// Where a selected volume will be read.
#[derive(Debug, Clone)]
pub enum Source {
    Mounted {
        node: String,
        pod: String,
        pod_uid: String,
        pv: String,
    },
    /// No running pod mounts it: a mount-holder pod will.
    Unmounted { pv: String },
    /// Cannot be read at all; the message says why.
    Unreadable(String),
}

/// The run's concurrency limits: one cluster-wide semaphore and one per node.
pub struct Limits {
    pub(super) cluster: Arc<Semaphore>,
    per_node: usize,
    nodes: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Limits {
    pub fn new(c: Option<&Concurrency>) -> Self {
        let limit = |v: Option<u32>| {
            v.filter(|n| *n > 0)
                .map_or(Semaphore::MAX_PERMITS, |n| n as usize)
        };
        Self {
            cluster: Arc::new(Semaphore::new(limit(c.and_then(|c| c.cluster)))),
            per_node: limit(c.and_then(|c| c.per_node)),
            nodes: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn node(&self, node: &str) -> Arc<Semaphore> {
        let mut nodes = match self.nodes.lock() {
            Ok(n) => n,
            Err(p) => p.into_inner(),
        };
        Arc::clone(
            nodes
                .entry(node.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_node))),
        )
    }
}

pub struct VolumeTask {
    pub run: Arc<Backup>,
    pub run_id: String,
    pub namespace: String,
    pub pvc: String,
    pub source: Source,
    pub repository: pb::Repository,
    /// The run resumed after a restart: look for a snapshot this run already made.
    pub resumed: bool,
    /// restic `--exclude` patterns from the PVC's and pod's annotations.
    pub excludes: Vec<String>,
    /// The hooks of the pod that mounts the volume, shared with its other volumes' tasks.
    pub hooks: Option<Arc<PodHooks>>,
}

impl VolumeTask {
    fn item(&self) -> ItemStatus {
        ItemStatus {
            namespace: self.namespace.clone(),
            pvc: self.pvc.clone(),
            phase: RunPhase::Pending,
            ..Default::default()
        }
    }

    /// Runs the task to its outcome; intermediate states go to `status`, the outcome is returned.
    /// The pod's post-backup hook runs after the last of its volumes, whatever happened to them.
    pub async fn run(self, ctx: Arc<Ctx>, limits: Arc<Limits>, status: StatusHandle) -> ItemStatus {
        let hooks = self.hooks.clone();
        let mut item = self.back_up(&ctx, limits, status).await;
        if let Some(h) = hooks
            && let Some(post) = h.done(&ctx).await
        {
            if let Some(e) = &post.error {
                tracing::warn!(run = %self.run_id, namespace = %self.namespace, pvc = %self.pvc, error = %e, "post-backup hook failed");
                let f = Finding::new("PostBackupHookFailed", e.clone());
                ctx.notifier.warn(self.run.as_ref(), "Hook", &f).await;
            }
            item.hooks.get_or_insert_with(Default::default).post = Some(post);
        }
        item
    }

    async fn back_up(
        &self,
        ctx: &Arc<Ctx>,
        limits: Arc<Limits>,
        status: StatusHandle,
    ) -> ItemStatus {
        let ctx = Arc::clone(ctx);
        let mut item = self.item();
        let failed = |mut item: ItemStatus, msg: String| {
            item.phase = RunPhase::Failed;
            item.percent_done = None;
            item.error = Some(msg);
            item
        };
        if self.resumed
            && let Some(done) = self.already_done(&ctx).await
        {
            return done;
        }
        // Always the cluster-wide slot first, then the node's: one order, so no deadlock. A mount
        // holder is created only once a cluster slot is free, so a run over many idle PVCs does not
        // start all their pods at once.
        let _cluster = limits.cluster.acquire().await;
        let (node, pod, pod_uid, pv, holder) = match self.source.clone() {
            Source::Unreadable(msg) => return failed(item, msg),
            Source::Mounted {
                node,
                pod,
                pod_uid,
                pv,
            } => (node, pod, pod_uid, pv, None),
            Source::Unmounted { pv } => {
                match mount_holder::hold(
                    &ctx.client,
                    &ctx.stores.pods,
                    self.run.as_ref(),
                    &self.pvc,
                    &mount_holder::Settings::of(&ctx.config),
                    true,
                )
                .await
                {
                    Ok(h) => (h.node, h.pod.clone(), h.uid, pv, Some(h.pod)),
                    Err(msg) => return failed(item, msg),
                }
            }
        };
        item.node = Some(node.clone());
        item.pod = Some(pod.clone());
        let result = {
            let node_limit = limits.node(&node);
            let _node = node_limit.acquire().await;
            if let Some(h) = &self.hooks {
                let pre = h.pre(&ctx).await;
                if let Some(pre) = pre {
                    let error = pre.error.clone();
                    item.hooks.get_or_insert_with(Default::default).pre = Some(pre);
                    if let Some(e) = error {
                        if !h.spec.continue_on_error {
                            return failed(
                                item,
                                format!(
                                    "{e}; the pod's volumes were not backed up (stowage.dev/hook-on-error: Fail)"
                                ),
                            );
                        }
                        tracing::warn!(run = %self.run_id, pod = %pod, error = %e, "pre-backup hook failed; backing up anyway (hook-on-error: Continue)");
                    }
                }
            }
            item.phase = RunPhase::Running;
            status.item(item.clone());
            ctx.metrics.volume_dispatches.inc();
            let job = VolumeJob {
                run_id: self.run_id.clone(),
                repository: self.repository.clone(),
                namespace: self.namespace.clone(),
                pvc: self.pvc.clone(),
                pod: pod.clone(),
                pod_uid,
                volume_name: pv,
                node: node.clone(),
                excludes: self.excludes.clone(),
            };
            let key = (self.namespace.clone(), self.pvc.clone());
            let mut inventory = mount_holder::InventoryWait::default();
            let mut lock_wait = super::LockWait::new(key.clone());
            loop {
                let r = dispatch::backup_volume(&ctx.agents, &job, |p| {
                    lock_wait.progress(&ctx, &self.run, &status, p);
                    if p.percent_done > 0.0 {
                        status.progress(key.clone(), p.percent_done);
                    }
                })
                .await;
                if inventory.again(holder.is_some(), r.as_ref().err()).await {
                    continue;
                }
                break r;
            }
        };
        if let Some(h) = &holder {
            mount_holder::release(&ctx.client, &self.namespace, h).await;
        }
        match result {
            Ok(r) => {
                record(&mut item, &r);
                if r.outcome == Outcome::Skipped as i32 {
                    let finding = Finding::new(
                        "VolumeSkipped",
                        format!(
                            "{}/{} on {node} was not backed up: {} (not a failure)",
                            self.namespace,
                            self.pvc,
                            skipped_reason_text(&r.skipped_reason)
                        ),
                    );
                    ctx.notifier
                        .normal(self.run.as_ref(), "Backup", &finding)
                        .await;
                }
                item
            }
            Err(e) => {
                tracing::warn!(run = %self.run_id, namespace = %self.namespace, pvc = %self.pvc, node = %node, error = %e, "volume backup failed");
                failed(item, e.to_string())
            }
        }
    }

    /// On resume: the outcome of a snapshot this run made of the volume before the restart. A
    /// snapshot the agent marked incomplete (restic exit 3) is partial, never a success.
    async fn already_done(&self, ctx: &Ctx) -> Option<ItemStatus> {
        let node = match &self.source {
            Source::Mounted { node, .. } => node.clone(),
            _ => ctx.agents.ready_nodes().first()?.clone(),
        };
        // Listing snapshots never creates a repository, whatever auto_init says.
        let found = dispatch::snapshots_of_run(
            &ctx.agents,
            &node,
            &self.repository,
            &self.namespace,
            &self.pvc,
            &self.run_id,
        )
        .await;
        let snaps = match found {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(run = %self.run_id, namespace = %self.namespace, pvc = %self.pvc, error = %e, "could not look for an earlier snapshot; backing up");
                return None;
            }
        };
        // A complete snapshot wins over a partial one of an earlier attempt.
        let complete = snaps
            .iter()
            .rev()
            .find(|s| !s.tags.iter().any(|t| t == TAG_PARTIAL));
        let chosen = complete.or(snaps.last())?;
        let partial = complete.is_none();
        tracing::info!(run = %self.run_id, namespace = %self.namespace, pvc = %self.pvc, snapshot = %chosen.id, partial, "already backed up by this run before the restart");
        let mut item = self.item();
        item.snapshot_id = Some(chosen.short_id.clone());
        if partial {
            item.phase = RunPhase::PartiallyFailed;
            item.error = Some(format!(
                "snapshot {} (made before a coordinator restart) is incomplete: restic could not read some files",
                chosen.short_id
            ));
        } else {
            item.phase = RunPhase::Succeeded;
        }
        Some(item)
    }
}

/// A sentence for an agent's skip reason.
fn skipped_reason_text(reason: &str) -> String {
    match reason {
        "EmptyVolume" => "the volume is empty, and restic stores no empty snapshots".into(),
        other => format!("skipped ({other})"),
    }
}

pub fn record(i: &mut ItemStatus, r: &BackupResult) {
    i.percent_done = None;
    i.duration_seconds = Some((r.duration_seconds * 1000.0).round() / 1000.0);
    if r.outcome == Outcome::Skipped as i32 {
        i.phase = RunPhase::Skipped;
        i.reason = Some(r.skipped_reason.clone());
        i.error = None;
        return;
    }
    i.reason = None;
    i.snapshot_id = Some(r.snapshot_id.clone());
    i.files_new = Some(r.files_new);
    i.files_changed = Some(r.files_changed);
    i.files_unmodified = Some(r.files_unmodified);
    i.bytes_added = Some(r.data_added_bytes);
    if r.outcome == Outcome::Succeeded as i32 {
        i.phase = RunPhase::Succeeded;
        i.error = None;
    } else {
        i.phase = RunPhase::PartiallyFailed;
        let first: Vec<String> = r
            .errors
            .iter()
            .take(3)
            .map(|e| format!("{}: {}", e.item, e.message))
            .collect();
        i.error = Some(format!(
            "snapshot {} is incomplete: restic could not read {} item(s) ({})",
            r.snapshot_id,
            r.errors.len().max(1),
            first.join("; ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_result_is_never_recorded_as_success() {
        let mut i = ItemStatus::default();
        record(
            &mut i,
            &BackupResult {
                outcome: Outcome::Partial as i32,
                snapshot_id: "abc".into(),
                errors: vec![pb::ItemError {
                    item: "secret.key".into(),
                    during: "archival".into(),
                    message: "permission denied".into(),
                }],
                ..Default::default()
            },
        );
        assert_eq!(i.phase, RunPhase::PartiallyFailed);
        assert!(
            i.error
                .as_deref()
                .unwrap()
                .contains("secret.key: permission denied")
        );
        record(
            &mut i,
            &BackupResult {
                outcome: Outcome::Succeeded as i32,
                snapshot_id: "abc".into(),
                files_new: 3,
                ..Default::default()
            },
        );
        assert_eq!(i.phase, RunPhase::Succeeded);
        assert_eq!(i.files_new, Some(3));
        assert_eq!(i.error, None);
        let mut empty = ItemStatus::default();
        record(
            &mut empty,
            &BackupResult {
                outcome: Outcome::Skipped as i32,
                skipped_reason: "EmptyVolume".into(),
                ..Default::default()
            },
        );
        assert_eq!(empty.phase, RunPhase::Skipped);
        assert_eq!(empty.reason.as_deref(), Some("EmptyVolume"));
        assert_eq!(empty.snapshot_id, None);
        let ok = ItemStatus {
            phase: RunPhase::Succeeded,
            ..Default::default()
        };
        assert_eq!(
            crate::runs::phase_of(&[ok.clone(), empty.clone()]),
            RunPhase::Succeeded
        );
        let failed = ItemStatus {
            phase: RunPhase::Failed,
            ..Default::default()
        };
        assert_eq!(
            crate::runs::phase_of(&[failed, empty]),
            RunPhase::Failed,
            "a skipped volume does not make a failed run partial"
        );
    }

    #[test]
    fn limits_default_to_unbounded_and_respect_settings() {
        let l = Limits::new(Some(&Concurrency {
            per_node: Some(2),
            cluster: Some(5),
        }));
        assert_eq!(l.cluster.available_permits(), 5);
        assert_eq!(l.node("n1").available_permits(), 2);
        assert!(Arc::ptr_eq(&l.node("n1"), &l.node("n1")));
        let u = Limits::new(None);
        assert_eq!(u.cluster.available_permits(), Semaphore::MAX_PERMITS);
    }
}
