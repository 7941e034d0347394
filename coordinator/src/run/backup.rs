//! A Backup run: plan which node's agent reads each selected volume (from the watch caches), run one
//! [`VolumeTask`] per volume under the run's concurrency limits, and record one status item per
//! volume through the run's status writer. Resuming after a coordinator restart never backs up a
//! finished volume again: items already done are kept, and for the others the agents are asked
//! whether a snapshot tagged with this run exists (a partial one counts as partial).

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use stowage_proto::v1 as pb;
use tonic::Code;

use super::command::CommandTask;
use super::hooks::{HookSpec, PodHooks};
use super::volume::{Limits, Source, VolumeTask};
use super::{begin, run_id};
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::dispatch::{self, CommandJob, DispatchError};
use crate::errors;
use crate::mount_holder;
use crate::plan::{self, PodInfo, PvcInfo};
use crate::prebackup_pod;
use crate::runs::phase_of;
use stowage_api::{Backup, ItemStatus, PreBackupPod, RunPhase};

use stowage_api::contract::{
    ANNOTATION_BACKUP_COMMAND, ANNOTATION_BACKUP_CONTAINER, ANNOTATION_BACKUP_TIMEOUT,
    ANNOTATION_EXCLUDE, ANNOTATION_FILE_EXTENSION,
};

pub const NOTHING_SELECTED: &str = "NothingSelected";
/// A backup command's time limit unless annotated (1 h).
const COMMAND_TIMEOUT_SECONDS: u32 = 3600;
pub const INVALID_SELECTOR: &str = "InvalidSelector";
pub const TOO_MANY_ITEMS: &str = "TooManyItems";
/// The most items (volumes and commands) one Backup may have: its status must fit in one object
/// with every item's identity, however long the names (see `status::STATUS_BUDGET`).
pub const MAX_RUN_ITEMS: usize = 1000;

/// One item of work a run found.
enum Work {
    Volume {
        namespace: String,
        pvc: String,
        source: Source,
        excludes: Vec<String>,
        hooks: Option<Arc<PodHooks>>,
    },
    /// A backup command; the run adds its id and repository. With a PreBackupPod, its pod is
    /// started first.
    Command(Box<CommandJob>, Option<Arc<PreBackupPod>>),
    /// A command that cannot run; the item says why.
    Fail(Box<ItemStatus>),
}

impl Work {
    /// The item as planned (Pending), or as failed.
    fn item(&self) -> ItemStatus {
        match self {
            Work::Volume { namespace, pvc, .. } => ItemStatus {
                namespace: namespace.clone(),
                pvc: pvc.clone(),
                phase: RunPhase::Pending,
                ..Default::default()
            },
            Work::Command(job, _) => CommandTask::item(job),
            Work::Fail(item) => (**item).clone(),
        }
    }

    fn key(&self) -> (String, String) {
        let i = self.item();
        (i.namespace.clone(), i.name())
    }
}

/// What to back up, or why nothing can be.
fn select(
    ctx: &Ctx,
    run_id: &str,
    namespace: &str,
    selector: Option<&LabelSelector>,
    selector_field: &str,
) -> Result<Vec<Work>, Finding> {
    // From the watch caches: a run LISTs nothing, whatever its size.
    let pvcs: Vec<PvcInfo> = ctx
        .stores
        .pvcs
        .in_namespace(namespace)
        .iter()
        .map(|p| PvcInfo::clone(p))
        .collect();
    let pods: Vec<PodInfo> = ctx
        .stores
        .pods
        .in_namespace(namespace)
        .iter()
        // Another run's mount holder is not a workload.
        .filter(|p| !p.labels.contains_key(mount_holder::LABEL_MOUNT_HOLDER))
        .map(|p| PodInfo::clone(p))
        .collect();
    let ready = ctx.agents.ready_nodes();
    let ready: Vec<&str> = ready.iter().map(String::as_str).collect();
    let planned = plan::plan(selector, &pvcs, &pods, &ready).map_err(|e| {
        Finding::new(
            INVALID_SELECTOR,
            format!(
                "{selector_field}{}: {}",
                e.field.trim_start_matches("selector"),
                e.reason
            ),
        )
    })?;
    let mut commands = command_work(&pods);
    commands.extend(prebackup_work(ctx, namespace));
    if planned.volume_count() == 0
        && commands.is_empty()
        && planned
            .skipped
            .iter()
            .all(|(_, _, r)| *r != plan::SkipReason::NotBound)
    {
        let excluded = planned.skipped.len();
        let what = if selector.is_some() {
            format!("{selector_field} matches no PersistentVolumeClaim in namespace {namespace}")
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
    let pvc_annotations: std::collections::HashMap<
        &str,
        &std::collections::BTreeMap<String, String>,
    > = pvcs
        .iter()
        .map(|p| (p.name.as_str(), &p.annotations))
        .collect();
    let pod_by_name: std::collections::HashMap<&str, &PodInfo> =
        pods.iter().map(|p| (p.name.as_str(), p)).collect();
    // Hooks per pod, shared by the tasks of its volumes.
    let mut volumes_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for a in planned.by_node.values().flatten() {
        *volumes_of.entry(a.pod).or_default() += 1;
    }
    let mut hooks: std::collections::HashMap<&str, Result<Option<Arc<PodHooks>>, String>> =
        std::collections::HashMap::new();
    let mut work = Vec::new();
    for (node, assigned) in &planned.by_node {
        let unavailable = ctx.agents.endpoint(node).err();
        for a in assigned {
            let pod = pod_by_name.get(a.pod).copied();
            let pod_hooks = hooks
                .entry(a.pod)
                .or_insert_with(|| {
                    let spec =
                        pod.map_or(Ok(None), |p| HookSpec::from_annotations(&p.annotations))?;
                    Ok(spec.map(|spec| {
                        Arc::new(PodHooks::new(
                            spec,
                            run_id,
                            a.namespace,
                            a.pod,
                            node,
                            volumes_of.get(a.pod).copied().unwrap_or(1),
                        ))
                    }))
                })
                .clone();
            let source = match (&unavailable, &pod_hooks) {
                (Some(e), _) => Source::Unreadable(e.to_string()),
                (None, Err(e)) => Source::Unreadable(format!("pod {}: {e}", a.pod)),
                (None, Ok(_)) => Source::Mounted {
                    node: node.to_string(),
                    pod: a.pod.into(),
                    pod_uid: a.pod_uid.into(),
                    pv: a.pv.into(),
                },
            };
            work.push(Work::Volume {
                namespace: a.namespace.into(),
                pvc: a.pvc.into(),
                source,
                excludes: plan::excludes(
                    ANNOTATION_EXCLUDE,
                    pvc_annotations
                        .get(a.pvc)
                        .copied()
                        .unwrap_or(&Default::default()),
                    pod.map(|p| &p.annotations),
                ),
                hooks: pod_hooks.ok().flatten(),
            });
        }
    }
    for (ns, pvc, pv) in &planned.needs_mount_holder {
        work.push(Work::Volume {
            namespace: ns.to_string(),
            pvc: pvc.to_string(),
            source: Source::Unmounted { pv: pv.to_string() },
            excludes: plan::excludes(
                ANNOTATION_EXCLUDE,
                pvc_annotations
                    .get(pvc)
                    .copied()
                    .unwrap_or(&Default::default()),
                None,
            ),
            hooks: None,
        });
    }
    for (ns, pvc, reason) in &planned.skipped {
        if *reason == plan::SkipReason::NotBound {
            work.push(Work::Volume {
                namespace: ns.to_string(),
                pvc: pvc.to_string(),
                source: Source::Unreadable(
                    "the PVC is not bound to a PersistentVolume yet; there is no data to back up"
                        .into(),
                ),
                excludes: Vec::new(),
                hooks: None,
            });
        }
    }
    work.extend(commands);
    Ok(work)
}

/// The PreBackupPods of the namespace, as work (their pods are started when the work runs).
fn prebackup_work(ctx: &Ctx, namespace: &str) -> Vec<Work> {
    ctx.stores
        .prebackup_pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace))
        .map(|p| {
            let container = p
                .spec
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .map(|c| c.name.clone())
                .unwrap_or_default();
            let name = p.name_any();
            let timeout = p
                .spec
                .timeout
                .as_deref()
                .and_then(|t| crate::config::parse_duration(t).ok())
                .and_then(|d| u32::try_from(d.as_secs()).ok())
                .filter(|s| *s > 0)
                .unwrap_or(COMMAND_TIMEOUT_SECONDS);
            let job = CommandJob {
                run_id: String::new(),
                repository: Default::default(),
                namespace: namespace.to_string(),
                // Known once the pod runs.
                pod: String::new(),
                node: String::new(),
                container: container.clone(),
                command: p.spec.backup_command.trim().to_string(),
                file_name: format!(
                    "{namespace}-{name}-{container}{}",
                    p.spec.file_extension.as_deref().unwrap_or_default().trim()
                ),
                timeout_seconds: timeout,
                owner_kind: "PreBackupPod".into(),
                owner_name: name,
            };
            Work::Command(Box::new(job), Some(p))
        })
        .collect()
}

/// A pod's command time limit in seconds, from `stowage.dev/backup-timeout` (default 1h).
pub(crate) fn command_timeout(p: &PodInfo) -> Result<u32, String> {
    match p.annotations.get(ANNOTATION_BACKUP_TIMEOUT) {
        None => Ok(COMMAND_TIMEOUT_SECONDS),
        Some(v) => crate::config::parse_duration(v)
            .ok()
            .filter(|d| !d.is_zero())
            .and_then(|d| u32::try_from(d.as_secs()).ok())
            .map(|s| s.max(1))
            .ok_or_else(|| format!("{v:?} is not a duration (e.g. 30m, 2h)")),
    }
}

/// The backup commands of the namespace's pods (one per owner), as work.
fn command_work(pods: &[PodInfo]) -> Vec<Work> {
    let (ready, unready) = plan::plan_commands(pods, ANNOTATION_BACKUP_COMMAND);
    let job = |a: &plan::CommandAssignment| {
        let p = a.pod;
        let annotation = |k: &str| p.annotations.get(k).cloned().unwrap_or_default();
        let container = annotation(ANNOTATION_BACKUP_CONTAINER);
        // `<namespace>-<pod>-<container><ext>`; the container is the first when none is named.
        let shown_container = if container.is_empty() {
            p.containers.first().cloned().unwrap_or_default()
        } else {
            container.clone()
        };
        CommandJob {
            run_id: String::new(),
            repository: Default::default(),
            namespace: p.namespace.clone(),
            pod: p.name.clone(),
            node: p.node.clone().unwrap_or_default(),
            container: shown_container.clone(),
            command: annotation(ANNOTATION_BACKUP_COMMAND).trim().to_string(),
            file_name: format!(
                "{}-{}-{}{}",
                p.namespace,
                p.name,
                shown_container,
                annotation(ANNOTATION_FILE_EXTENSION).trim()
            ),
            timeout_seconds: 0,
            owner_kind: a.owner_kind.clone(),
            owner_name: a.owner_name.clone(),
        }
    };
    let mut work = Vec::new();
    for a in &ready {
        let mut j = job(a);
        match command_timeout(a.pod) {
            Ok(s) => j.timeout_seconds = s,
            Err(m) => {
                let mut item = CommandTask::item(&j);
                item.phase = RunPhase::Failed;
                item.error = Some(format!(
                    "pod {}: annotation {ANNOTATION_BACKUP_TIMEOUT}: {m}",
                    a.pod.name
                ));
                work.push(Work::Fail(Box::new(item)));
                continue;
            }
        }
        work.push(Work::Command(Box::new(j), None));
    }
    for a in &unready {
        let mut item = CommandTask::item(&job(a));
        item.phase = RunPhase::Failed;
        item.error = Some(format!(
            "none of the {} pod(s) of {}/{} with a backup command is running and ready",
            a.replicas, a.owner_kind, a.owner_name
        ));
        work.push(Work::Fail(Box::new(item)));
    }
    work
}

pub async fn execute(ctx: Arc<Ctx>, run: Arc<Backup>) -> Result<(), kube::Error> {
    let namespace = run.namespace().unwrap_or_default();
    let Some(begun) = begin(ctx.as_ref(), run.as_ref()).await? else {
        return Ok(());
    };
    let selector_field = begun.origin.field("selector");
    let work = match select(
        &ctx,
        &run_id(run.as_ref()),
        &namespace,
        begun.spec.selector.as_ref(),
        &selector_field,
    ) {
        Ok(w) if w.len() > MAX_RUN_ITEMS => {
            let f = Finding::new(
                TOO_MANY_ITEMS,
                format!(
                    "{selector_field}: the run would back up {} volumes and commands, and a run holds at most {MAX_RUN_ITEMS} (its status must fit in one object); split namespace {namespace} between Schedules with selectors",
                    w.len()
                ),
            );
            begun
                .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
                .await;
            return Ok(());
        }
        Ok(w) => w,
        Err(f) => {
            begun
                .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
                .await;
            return Ok(());
        }
    };
    // One agent opens (or creates) the repository first: parallel first backups must not each
    // initialise it. An unreachable agent is skipped; if none answers, the volumes fail one by one
    // with the reason.
    let location = stowage_common::backend::location(&begun.repository);
    for node in ctx.agents.ready_nodes() {
        if ctx.repository_known(&location) {
            break;
        }
        match dispatch::ensure_repository(&ctx.agents, &node, &begun.repository).await {
            Ok(()) => {
                ctx.remember_repository(&location);
                break;
            }
            Err(e) if e.try_elsewhere() => continue,
            Err(e) => {
                let f = repository_finding(&e, &begun.repository, &begun.origin.field("backend"));
                begun
                    .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
                    .await;
                return Ok(());
            }
        }
    }
    let selected: Vec<(String, String)> = work.iter().map(Work::key).collect();
    let mut items: Vec<ItemStatus> = Vec::new();
    for i in &begun.before.items {
        let key = (i.namespace.clone(), i.name());
        if i.phase.is_fine() {
            items.push(i.clone());
        } else if !selected.contains(&key) {
            // Items of an earlier attempt no longer selected (PVC deleted or excluded since) must
            // not stay Pending or Running in a finished run.
            let mut i = i.clone();
            i.phase = RunPhase::Failed;
            i.percent_done = None;
            i.error = Some(
                "no longer selected when the run resumed (PVC or pod deleted, or excluded)".into(),
            );
            items.push(i);
        }
    }
    let done: Vec<(String, String)> = items
        .iter()
        .map(|i| (i.namespace.clone(), i.name()))
        .collect();
    let todo: Vec<Work> = work
        .into_iter()
        .filter(|w| !done.contains(&w.key()))
        .collect();
    // Each pod's post-hook runs after the last of its volumes that this attempt backs up.
    let mut per_pod: Vec<(Arc<PodHooks>, usize)> = Vec::new();
    for w in &todo {
        if let Work::Volume { hooks: Some(h), .. } = w {
            match per_pod.iter_mut().find(|(p, _)| Arc::ptr_eq(p, h)) {
                Some((_, n)) => *n += 1,
                None => per_pod.push((Arc::clone(h), 1)),
            }
        }
    }
    for (h, n) in per_pod {
        h.set_tasks(n);
    }
    let pending: Vec<ItemStatus> = todo.iter().map(Work::item).collect();
    let mut listed = items.clone();
    listed.extend(pending);
    begun.status.run(move |s| s.items = listed);
    if let Err(e) = begun.status.flush().await {
        tracing::warn!(run = %run_id(run.as_ref()), error = %errors::sentence(&e), "writing the planned items");
    }
    let limits = Arc::new(Limits::new(begun.spec.concurrency.as_ref()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut spawned = std::collections::HashMap::new();
    for w in todo {
        let planned = w.item();
        let (ctx, limits, status) = (Arc::clone(&ctx), Arc::clone(&limits), begun.status.clone());
        let handle = match w {
            Work::Volume {
                namespace,
                pvc,
                source,
                excludes,
                hooks,
            } => {
                let task = VolumeTask {
                    run: Arc::clone(&run),
                    run_id: run_id(run.as_ref()),
                    namespace,
                    pvc,
                    source,
                    repository: begun.repository.clone(),
                    resumed: begun.resumed,
                    excludes,
                    hooks,
                };
                tasks.spawn(async move {
                    let outcome = task.run(ctx, limits, status.clone()).await;
                    status.item(outcome.clone());
                    outcome
                })
            }
            Work::Command(mut job, prebackup) => {
                job.run_id = run_id(run.as_ref());
                job.repository = begun.repository.clone();
                let task = CommandTask {
                    run: Arc::clone(&run),
                    job: *job,
                    prebackup,
                    resumed: begun.resumed,
                };
                tasks.spawn(async move {
                    let outcome = task.run(ctx, limits, status.clone()).await;
                    status.item(outcome.clone());
                    outcome
                })
            }
            Work::Fail(item) => tasks.spawn(async move {
                status.item((*item).clone());
                *item
            }),
        };
        spawned.insert(handle.id(), planned);
    }
    // The run always completes: a task that ended abnormally still leaves a failed item.
    while let Some(r) = tasks.join_next_with_id().await {
        match r {
            Ok((_, outcome)) => items.push(outcome),
            Err(e) => {
                tracing::error!(run = %run_id(run.as_ref()), error = %e, "a volume task ended abnormally");
                if let Some(planned) = spawned.remove(&e.id()) {
                    let failed = ItemStatus {
                        phase: RunPhase::Failed,
                        error: Some(
                            "the coordinator's task for this item ended abnormally (see its log)"
                                .into(),
                        ),
                        ..planned
                    };
                    begun.status.item(failed.clone());
                    items.push(failed);
                }
            }
        }
    }
    // Pods an earlier attempt of this run started (before a coordinator restart) go too.
    prebackup_pod::release_all(&ctx.client, &ctx.stores.pods, run.as_ref()).await;
    let phase = phase_of(&items);
    let finding = verdict(&items, phase);
    begun
        .finish(ctx.as_ref(), run.as_ref(), phase, &finding)
        .await;
    Ok(())
}

/// What a run's items are, for its condition: volumes, commands, or both.
fn what(items: &[ItemStatus]) -> &'static str {
    let commands = items.iter().filter(|i| i.command.is_some()).count();
    match commands {
        0 => "volumes with data",
        n if n == items.len() => "backup commands",
        _ => "volumes with data and backup commands",
    }
}

/// The run's condition: what succeeded, and each failure (bounded: a run may have thousands).
fn verdict(items: &[ItemStatus], phase: RunPhase) -> Finding {
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
                i.name(),
                i.node
                    .as_deref()
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default(),
                errors::bounded(i.error.as_deref().unwrap_or("failed"), 300)
            )
        })
        .collect();
    let failures = errors::joined_within(&failed, errors::CONDITION_MESSAGE_MAX - 200);
    let ok = items.len() - failed.len() - skipped;
    let skipped_note = if skipped > 0 {
        format!(" ({skipped} empty volume(s) skipped)")
    } else {
        String::new()
    };
    match phase {
        RunPhase::Succeeded => Finding::new(
            "BackedUp",
            format!("all {ok} {} have a new snapshot{skipped_note}", what(items)),
        ),
        RunPhase::PartiallyFailed => Finding::new(
            "SomeVolumesFailed",
            format!(
                "{ok} of {} {} backed up{skipped_note}; {failures}",
                items.len() - skipped,
                what(items),
            ),
        ),
        _ => Finding::new(
            "AllVolumesFailed",
            format!("nothing was backed up: {failures}"),
        ),
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
                stowage_common::backend::location(repository)
            ),
        );
    }
    Finding::new(
        "RepositoryUnavailable",
        format!("opening the repository: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_failures_make_a_bounded_verdict() {
        let items: Vec<ItemStatus> = (0..1000)
            .map(|i| ItemStatus {
                namespace: "ns".into(),
                pvc: format!("data-{i}"),
                phase: RunPhase::Failed,
                error: Some("x".repeat(2000)),
                ..Default::default()
            })
            .collect();
        let f = verdict(&items, phase_of(&items));
        assert_eq!(f.reason, "AllVolumesFailed");
        assert!(
            f.message.len() <= errors::CONDITION_MESSAGE_MAX,
            "{}",
            f.message.len()
        );
        assert!(
            f.message.ends_with("more"),
            "{}",
            &f.message[f.message.len() - 40..]
        );
    }
}
