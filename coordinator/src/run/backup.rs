//! A Backup run: plan which node's agent reads each selected volume, hold unmounted PVCs with a
//! mount-holder pod, dispatch under the run's concurrency limits, and record one status item per
//! volume. Resuming after a coordinator restart never backs up a finished volume again: items
//! already Succeeded are kept, and for the others the agents are asked whether a snapshot tagged
//! with this run exists.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use stowage_proto::v1::{self as pb, BackupResult, Outcome};
use tokio::sync::Semaphore;
use tonic::Code;

use super::{Begun, Shared, begin, finish, run_id};
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::crd::{Backup, Concurrency, ItemStatus, RunPhase};
use crate::dispatch::{self, DispatchError, VolumeJob};
use crate::mount_holder;
use crate::plan::{self, PodInfo, PvcInfo};
use crate::runs::{StatusWriter, phase_of};

pub const NOTHING_SELECTED: &str = "NothingSelected";
pub const INVALID_SELECTOR: &str = "InvalidSelector";

/// Where a selected volume will be read.
enum Source {
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

struct Work {
    namespace: String,
    pvc: String,
    source: Source,
}

/// The run's concurrency limits: one cluster-wide semaphore and one per node.
struct Limits {
    cluster: Arc<Semaphore>,
    per_node: usize,
    nodes: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Limits {
    fn new(c: Option<&Concurrency>) -> Self {
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

    fn node(&self, node: &str) -> Arc<Semaphore> {
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

fn item_key(i: &ItemStatus) -> (&str, &str) {
    (i.namespace.as_str(), i.pvc.as_str())
}

/// Applies `f` to the item of `namespace/pvc`, creating it if needed.
fn with_item(
    writer: &StatusWriter<Backup>,
    namespace: &str,
    pvc: &str,
    f: impl FnOnce(&mut ItemStatus),
) {
    writer.update(|s| {
        let idx = match s.items.iter().position(|i| item_key(i) == (namespace, pvc)) {
            Some(i) => i,
            None => {
                s.items.push(ItemStatus {
                    namespace: namespace.into(),
                    pvc: pvc.into(),
                    ..Default::default()
                });
                s.items.len() - 1
            }
        };
        if let Some(item) = s.items.get_mut(idx) {
            f(item);
        }
    });
}

fn pvc_info(p: &PersistentVolumeClaim) -> PvcInfo {
    PvcInfo {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        labels: p.labels().clone(),
        annotations: p.annotations().clone(),
        volume_name: p
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|v| !v.is_empty()),
    }
}

fn pod_info(p: &Pod) -> PodInfo {
    let running = p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    PodInfo {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        uid: p.uid().unwrap_or_default(),
        node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
        running,
        annotations: p.annotations().clone(),
        claims: p
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .map(|vs| {
                vs.iter()
                    .filter_map(|v| v.persistent_volume_claim.as_ref())
                    .map(|c| c.claim_name.clone())
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// What to back up, or why nothing can be.
async fn select(
    ctx: &Ctx,
    namespace: &str,
    selector: Option<&LabelSelector>,
) -> Result<Vec<Work>, Finding> {
    let lp = ListParams::default();
    let listed =
        |e: kube::Error| Finding::new("ListFailed", format!("listing in {namespace}: {e}"));
    let pvcs: Vec<PvcInfo> =
        Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), namespace)
            .list(&lp)
            .await
            .map_err(listed)?
            .items
            .iter()
            .map(pvc_info)
            .collect();
    let pods: Vec<PodInfo> = Api::<Pod>::namespaced(ctx.client.clone(), namespace)
        .list(&lp)
        .await
        .map_err(listed)?
        .items
        .iter()
        // Another run's mount holder is not a workload.
        .filter(|p| !p.labels().contains_key(mount_holder::LABEL_MOUNT_HOLDER))
        .map(pod_info)
        .collect();
    let ready = ctx.agents.ready_nodes();
    let ready: Vec<&str> = ready.iter().map(String::as_str).collect();
    let planned = plan::plan(selector, &pvcs, &pods, &ready)
        .map_err(|e| Finding::new(INVALID_SELECTOR, format!("spec.{}: {}", e.field, e.reason)))?;
    if planned.volume_count() == 0
        && planned
            .skipped
            .iter()
            .all(|(_, _, r)| *r != plan::SkipReason::NotBound)
    {
        let excluded = planned.skipped.len();
        let what = if selector.is_some() {
            format!("spec.selector matches no PersistentVolumeClaim in namespace {namespace}")
        } else {
            format!("namespace {namespace} has no PersistentVolumeClaim")
        };
        let more = if excluded > 0 {
            format!(
                " to back up ({excluded} excluded by the {} annotation)",
                plan::BACKUP_ANNOTATION
            )
        } else {
            String::new()
        };
        return Err(Finding::new(NOTHING_SELECTED, format!("{what}{more}")));
    }
    let mut work = Vec::new();
    for (node, assigned) in &planned.by_node {
        let unavailable = ctx.agents.endpoint(node).err();
        for a in assigned {
            let source = match &unavailable {
                Some(e) => Source::Unreadable(e.to_string()),
                None => Source::Mounted {
                    node: node.to_string(),
                    pod: a.pod.into(),
                    pod_uid: a.pod_uid.into(),
                    pv: a.pv.into(),
                },
            };
            work.push(Work {
                namespace: a.namespace.into(),
                pvc: a.pvc.into(),
                source,
            });
        }
    }
    for (ns, pvc, pv) in &planned.needs_mount_holder {
        work.push(Work {
            namespace: ns.to_string(),
            pvc: pvc.to_string(),
            source: Source::Unmounted { pv: pv.to_string() },
        });
    }
    for (ns, pvc, reason) in &planned.skipped {
        if *reason == plan::SkipReason::NotBound {
            work.push(Work {
                namespace: ns.to_string(),
                pvc: pvc.to_string(),
                source: Source::Unreadable(
                    "the PVC is not bound to a PersistentVolume yet; there is no data to back up"
                        .into(),
                ),
            });
        }
    }
    Ok(work)
}

pub async fn execute(ctx: Arc<Ctx>, run: Arc<Backup>) -> Result<(), kube::Error> {
    let namespace = run.namespace().unwrap_or_default();
    let Some(Begun {
        writer,
        resumed,
        repository,
        schedule,
    }) = begin(ctx.as_ref(), run.as_ref()).await?
    else {
        return Ok(());
    };
    let from_schedule = schedule.as_ref().and_then(|s| s.spec.backup.as_ref());
    let selector = run
        .spec
        .selector
        .as_ref()
        .or(from_schedule.and_then(|b| b.selector.as_ref()));
    let concurrency = run
        .spec
        .concurrency
        .as_ref()
        .or(from_schedule.and_then(|b| b.concurrency.as_ref()));
    let work = match select(&ctx, &namespace, selector).await {
        Ok(w) => w,
        Err(f) => return super::fail(&ctx, run.as_ref(), &writer, &f).await,
    };
    // One agent opens (or creates) the repository first: parallel first backups must not each
    // initialise it. An unreachable agent is skipped; if none answers, the volumes fail one by one
    // with the reason.
    let location = crate::backend::location(&repository);
    for node in ctx.agents.ready_nodes() {
        if ctx.repository_known(&location) {
            break;
        }
        match dispatch::ensure_repository(&ctx.agents, &node, &repository).await {
            Ok(()) => {
                ctx.remember_repository(&location);
                break;
            }
            Err(e) if e.try_elsewhere() => continue,
            Err(e) => {
                let at = match (&run.spec.backend, &schedule) {
                    (None, Some(s)) => format!("Schedule {}: spec.backend", s.name_any()),
                    _ => "spec.backend".to_string(),
                };
                let f = repository_finding(&e, &repository, &at);
                return super::fail(&ctx, run.as_ref(), &writer, &f).await;
            }
        }
    }
    let done: Vec<(String, String)> = writer
        .snapshot()
        .items
        .iter()
        .filter(|i| i.phase.is_fine())
        .map(|i| (i.namespace.clone(), i.pvc.clone()))
        .collect();
    // Items of an earlier attempt that are no longer selected (PVC deleted or excluded since) must
    // not stay Pending or Running in a finished run.
    let selected: Vec<(String, String)> = work
        .iter()
        .map(|w| (w.namespace.clone(), w.pvc.clone()))
        .collect();
    writer.update(|s| {
        for i in s.items.iter_mut().filter(|i| !i.phase.is_fine()) {
            if !selected.contains(&(i.namespace.clone(), i.pvc.clone())) {
                i.phase = RunPhase::Failed;
                i.percent_done = None;
                i.error = Some(
                    "no longer selected when the run resumed (PVC deleted or excluded)".into(),
                );
            }
        }
    });
    let limits = Arc::new(Limits::new(concurrency));
    let ticker = writer.progress_ticker();
    let mut tasks = tokio::task::JoinSet::new();
    for w in work {
        if done.contains(&(w.namespace.clone(), w.pvc.clone())) {
            continue;
        }
        with_item(&writer, &w.namespace, &w.pvc, |i| {
            i.phase = RunPhase::Pending;
            i.error = None;
        });
        tasks.spawn(back_up_one(
            Arc::clone(&ctx),
            Arc::clone(&run),
            Arc::clone(&writer),
            w,
            repository.clone(),
            Arc::clone(&limits),
            resumed,
        ));
    }
    writer.flush().await?;
    while tasks.join_next().await.is_some() {}
    ticker.abort();

    let items = writer.snapshot().items;
    let phase = phase_of(&items);
    let skipped = items
        .iter()
        .filter(|i| i.phase == RunPhase::Skipped)
        .count();
    let failed: Vec<String> = items
        .iter()
        .filter(|i| !i.phase.is_fine())
        .map(|i| {
            format!(
                "{}/{}{}: {}",
                i.namespace,
                i.pvc,
                i.node
                    .as_deref()
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default(),
                i.error.as_deref().unwrap_or("failed")
            )
        })
        .collect();
    let ok = items.len() - failed.len() - skipped;
    let skipped_note = if skipped > 0 {
        format!(" ({skipped} empty volume(s) skipped)")
    } else {
        String::new()
    };
    let finding = match phase {
        RunPhase::Succeeded => Finding::new(
            "BackedUp",
            format!("all {ok} volumes with data have a new snapshot{skipped_note}"),
        ),
        RunPhase::PartiallyFailed => Finding::new(
            "SomeVolumesFailed",
            format!(
                "{ok} of {} volumes backed up{skipped_note}; {}",
                items.len() - skipped,
                failed.join("; ")
            ),
        ),
        _ => Finding::new(
            "AllVolumesFailed",
            format!("no volume was backed up: {}", failed.join("; ")),
        ),
    };
    finish(&ctx, run.as_ref(), &writer, phase, &finding).await
}

async fn back_up_one(
    ctx: Arc<Ctx>,
    run: Arc<Backup>,
    writer: Shared<Backup>,
    work: Work,
    repository: pb::Repository,
    limits: Arc<Limits>,
    resumed: bool,
) {
    let Work {
        namespace,
        pvc,
        source,
    } = work;
    let id = run_id(run.as_ref());
    let fail = |msg: String| {
        with_item(&writer, &namespace, &pvc, |i| {
            i.phase = RunPhase::Failed;
            i.percent_done = None;
            i.error = Some(msg);
        });
    };
    if resumed && already_done(&ctx, &writer, &namespace, &pvc, &repository, &id, &source).await {
        let _ = writer.flush().await;
        return;
    }
    // Always the cluster-wide slot first, then the node's: one order, so no deadlock. A mount holder
    // is created only once a cluster slot is free, so a run over many idle PVCs does not start all
    // their pods at once.
    let _cluster = limits.cluster.acquire().await;
    let (node, pod, pod_uid, pv, holder) = match source {
        Source::Unreadable(msg) => {
            fail(msg);
            let _ = writer.flush().await;
            return;
        }
        Source::Mounted {
            node,
            pod,
            pod_uid,
            pv,
        } => (node, pod, pod_uid, pv, None),
        Source::Unmounted { pv } => {
            match mount_holder::hold(
                &ctx.client,
                run.as_ref(),
                &pvc,
                &ctx.config.mount_holder_image,
                ctx.config.mount_holder_timeout,
            )
            .await
            {
                Ok(h) => (h.node, h.pod.clone(), h.uid, pv, Some(h.pod)),
                Err(msg) => {
                    fail(msg);
                    let _ = writer.flush().await;
                    return;
                }
            }
        }
    };
    with_item(&writer, &namespace, &pvc, |i| {
        i.node = Some(node.clone());
        i.pod = Some(pod.clone());
    });
    let result = {
        let node_limit = limits.node(&node);
        let _node = node_limit.acquire().await;
        with_item(&writer, &namespace, &pvc, |i| i.phase = RunPhase::Running);
        let _ = writer.flush().await;
        ctx.metrics.volume_dispatches.inc();
        let job = VolumeJob {
            run_id: id.clone(),
            repository,
            namespace: namespace.clone(),
            pvc: pvc.clone(),
            pod: pod.clone(),
            pod_uid,
            volume_name: pv,
            node: node.clone(),
        };
        let mut attempts = 0;
        loop {
            let r = dispatch::backup_volume(&ctx.agents, &job, |p| {
                if p.percent_done > 0.0 {
                    with_item(&writer, &namespace, &pvc, |i| {
                        i.percent_done = Some((p.percent_done * 1000.0).round() / 10.0);
                    });
                }
            })
            .await;
            // A holder's volume may take a moment to appear in the agent's inventory.
            let not_there_yet = matches!(
                &r,
                Err(DispatchError::Agent {
                    code: Code::NotFound,
                    ..
                })
            );
            if holder.is_some() && not_there_yet && attempts < 20 {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
            break r;
        }
    };
    if let Some(h) = &holder {
        mount_holder::release(&ctx.client, &namespace, h).await;
    }
    match result {
        Ok(r) => {
            with_item(&writer, &namespace, &pvc, |i| record(i, &r));
            if r.outcome == Outcome::Skipped as i32 {
                let finding = Finding::new(
                    "VolumeSkipped",
                    format!(
                        "{namespace}/{pvc} on {node} was not backed up: {} (not a failure)",
                        skipped_reason_text(&r.skipped_reason)
                    ),
                );
                ctx.notifier.normal(run.as_ref(), "Backup", &finding).await;
            }
        }
        Err(e) => {
            tracing::warn!(run = %id, namespace = %namespace, pvc = %pvc, node = %node, error = %e, "volume backup failed");
            fail(e.to_string());
        }
    }
    if let Err(e) = writer.flush().await {
        tracing::warn!(run = %id, error = %e, "writing run status");
    }
}

/// On resume: whether this run already made a snapshot of the volume before the restart.
async fn already_done(
    ctx: &Ctx,
    writer: &StatusWriter<Backup>,
    namespace: &str,
    pvc: &str,
    repository: &pb::Repository,
    id: &str,
    source: &Source,
) -> bool {
    let ready = ctx.agents.ready_nodes();
    let node = match source {
        Source::Mounted { node, .. } => node.clone(),
        _ => match ready.first() {
            Some(n) => n.clone(),
            None => return false,
        },
    };
    // Listing snapshots never creates a repository, whatever auto_init says.
    match dispatch::snapshots_of_run(&ctx.agents, &node, repository, namespace, pvc, id).await {
        Ok(snaps) => match snaps.last() {
            Some(s) => {
                tracing::info!(run = %id, namespace, pvc, snapshot = %s.id, "already backed up by this run before the restart");
                let snapshot = s.short_id.clone();
                with_item(writer, namespace, pvc, |i| {
                    i.phase = RunPhase::Succeeded;
                    i.snapshot_id = Some(snapshot);
                    i.percent_done = None;
                    i.error = None;
                });
                true
            }
            None => false,
        },
        Err(e) => {
            tracing::debug!(run = %id, namespace, pvc, error = %e, "could not look for an earlier snapshot; backing up");
            false
        }
    }
}

/// Why the repository could not be opened, naming the spec field (under `at`) where it can.
fn repository_finding(e: &DispatchError, repository: &pb::Repository, at: &str) -> Finding {
    let DispatchError::Agent { code, message, .. } = e else {
        return Finding::new(
            "RepositoryUnavailable",
            format!("opening the repository: {e}"),
        );
    };
    if *code == Code::InvalidArgument
        && let Some(reason) = message.strip_prefix("repository.local.path: ")
    {
        return Finding::new("LocalPathNotAllowed", format!("{at}.local.path: {reason}"));
    }
    // The agent's wording of restic's exit 10 (restic_wrap::Error::RepositoryNotFound).
    if *code == Code::FailedPrecondition && message.starts_with("no restic repository at") {
        use pb::repository::Backend as B;
        let field = match &repository.backend {
            Some(B::Local(_)) => "local.path",
            Some(B::S3(_)) => "s3.bucket and s3.prefix",
            Some(B::Rest(_)) => "rest.url",
            None => "",
        };
        return Finding::new(
            "RepositoryNotFound",
            format!(
                "{at}.{field}: there is no repository at {}. Stowage creates a repository only on a \
                 Schedule's first runs or with {at}.initialize: true, so that a mistyped location \
                 never starts a new, empty history. Correct the location, or set initialize to \
                 create a repository there.",
                crate::backend::location(repository)
            ),
        );
    }
    Finding::new(
        "RepositoryUnavailable",
        format!("opening the repository: {e}"),
    )
}

/// A sentence for an agent's skip reason.
fn skipped_reason_text(reason: &str) -> String {
    match reason {
        "EmptyVolume" => "the volume is empty, and restic stores no empty snapshots".into(),
        other => format!("skipped ({other})"),
    }
}

fn record(i: &mut ItemStatus, r: &BackupResult) {
    if r.outcome == Outcome::Skipped as i32 {
        i.phase = RunPhase::Skipped;
        i.reason = Some(r.skipped_reason.clone());
        i.error = None;
        i.percent_done = None;
        i.duration_seconds = Some((r.duration_seconds * 1000.0).round() / 1000.0);
        return;
    }
    i.reason = None;
    i.snapshot_id = Some(r.snapshot_id.clone());
    i.files_new = Some(r.files_new);
    i.files_changed = Some(r.files_changed);
    i.files_unmodified = Some(r.files_unmodified);
    i.bytes_added = Some(r.data_added_bytes);
    i.duration_seconds = Some((r.duration_seconds * 1000.0).round() / 1000.0);
    i.percent_done = None;
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
