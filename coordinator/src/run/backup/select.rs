//! What a Backup run backs up: the volumes the planner assigns from the watch caches, the backup
//! commands of annotated pods, and the PreBackupPods of the namespace; or why nothing can be.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::sync::Arc;

use super::*;
use crate::dispatch::CommandJob;
use crate::mount_holder;
use crate::plan::{self, PodInfo, PvcInfo};
use crate::run::command::CommandTask;
use crate::run::hooks::{HookSpec, PodHooks};
use crate::run::volume::Source;
use stowage_api::contract::{
    ANNOTATION_BACKUP_COMMAND, ANNOTATION_BACKUP_CONTAINER, ANNOTATION_BACKUP_TIMEOUT,
    ANNOTATION_EXCLUDE, ANNOTATION_FILE_EXTENSION,
};
use stowage_api::{ItemStatus, PreBackupPod, RunPhase};

/// One item of work a run found.
pub(crate) enum Work {
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
    pub(crate) fn item(&self) -> ItemStatus {
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

    pub(super) fn key(&self) -> (String, String) {
        let i = self.item();
        (i.namespace.clone(), i.name())
    }
}

/// What to back up, or why nothing can be.
pub(crate) fn select(
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
