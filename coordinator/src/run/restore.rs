//! Restore runs: find where the target lives, resolve the snapshot among the source's own (and
//! record it before anything is written), then ask the agent of the target's node to write it:
//! into the volume while its pods run (an unmounted PVC gets a read-write mount holder), or, for a
//! backup command's snapshot, into the target pod's restore command.

use std::sync::Arc;

use chrono::{DateTime, FixedOffset};
use kube::ResourceExt;
use stowage_api::contract::{
    ANNOTATION_BACKUP_CONTAINER, ANNOTATION_BACKUP_TIMEOUT, ANNOTATION_RESTORE_COMMAND, TAG_PARTIAL,
};
use stowage_proto::v1::{self as pb, RestoreCommandRequest, RestoreRequest, SnapshotsRequest};

use super::maintenance::human_bytes;
use super::status::StatusHandle;
use super::{Begun, begin, run_id};
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::dispatch::{self, SNAPSHOTS_TIMEOUT};
use crate::mount_holder;
use crate::plan::PodInfo;
use stowage_api::{CommandItem, Restore, RestoreMode, RestoreOutcome, RunPhase};

pub const INVALID_RESTORE: &str = "InvalidRestore";
pub const CROSS_NAMESPACE: &str = "CrossNamespaceRefused";
pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
pub const SNAPSHOT_NOT_FOUND: &str = "SnapshotNotFound";
pub const NO_RESTORE_COMMAND: &str = "NoRestoreCommand";
pub const RESTORE_FAILED: &str = "RestoreFailed";
pub const COMMAND_NOT_RESUMED: &str = "CommandRestoreInterrupted";

/// Which snapshot, as asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Wanted {
    Latest,
    Id(String),
    Before(DateTime<FixedOffset>),
}

/// What is restored, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum What {
    Volume(VolumeRestore),
    Command(CommandRestore),
}

/// A PVC's snapshot into a volume.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRestore {
    pub pvc: String,
    pub target_pvc: String,
    /// Relative to the volume root, normalised.
    pub include: Vec<String>,
    pub path: String,
    pub mode: RestoreMode,
}

/// A backup command's snapshot into a restore command.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRestore {
    pub owner_kind: String,
    pub owner_name: String,
    pub container: Option<String>,
    pub target_pod: Option<String>,
}

/// A Restore's spec, checked: every field a message can name.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// Whose snapshots.
    pub source_namespace: String,
    pub what: What,
    pub wanted: Wanted,
    /// `latest` and `before` may choose a partial snapshot (`spec.source.allowPartial`).
    pub allow_partial: bool,
}

/// A path inside a volume, as users write it (`/pgdata/base` or `pgdata/base`), made relative.
fn volume_path(p: &str, field: &str) -> Result<String, Finding> {
    let bad = |why: &str| Finding::new(INVALID_RESTORE, format!("{field}: {p:?} {why}"));
    if p.contains('\0') {
        return Err(bad("contains NUL"));
    }
    let mut parts = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(bad("leaves the volume ('..' is not allowed)")),
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Checks the spec of a Restore in `namespace`. Pure: every refusal names its field.
pub fn check(r: &Restore, namespace: &str, cross_namespace: bool) -> Result<Checked, Finding> {
    let s = &r.spec.source;
    let t = &r.spec.target;
    let source_namespace = s.namespace.clone().unwrap_or_else(|| namespace.to_string());
    if source_namespace != namespace && !cross_namespace {
        return Err(Finding::new(
            CROSS_NAMESPACE,
            format!(
                "spec.source.namespace: a Restore in namespace {namespace} may not read the snapshots of namespace {source_namespace} (the coordinator runs without --allow-cross-namespace-restore)"
            ),
        ));
    }
    let wanted = match (s.snapshot.as_deref(), s.before.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(Finding::new(
                INVALID_RESTORE,
                "spec.source.before: set either snapshot or before, not both",
            ));
        }
        (None | Some("latest") | Some(""), None) => Wanted::Latest,
        (Some(id), None) => {
            if id.len() < 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Finding::new(
                    INVALID_RESTORE,
                    format!(
                        "spec.source.snapshot: {id:?} is neither \"latest\" nor a snapshot id (at least 8 hex digits)"
                    ),
                ));
            }
            Wanted::Id(id.to_ascii_lowercase())
        }
        (None, Some(t)) => Wanted::Before(DateTime::parse_from_rfc3339(t).map_err(|_| {
            Finding::new(
                INVALID_RESTORE,
                format!(
                    "spec.source.before: {t:?} is not an RFC 3339 time (e.g. 2026-11-20T00:00:00Z)"
                ),
            )
        })?),
    };
    let what = match (&s.pvc, &s.command) {
        (Some(pvc), None) if !pvc.is_empty() => {
            let include = s
                .include
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let field = format!("spec.source.include[{i}]");
                    let rel = volume_path(p, &field)?;
                    if rel.is_empty() {
                        return Err(Finding::new(
                            INVALID_RESTORE,
                            format!("{field}: {p:?} names the whole volume; leave include empty for that"),
                        ));
                    }
                    Ok(rel)
                })
                .collect::<Result<Vec<_>, _>>()?;
            What::Volume(VolumeRestore {
                pvc: pvc.clone(),
                target_pvc: t.pvc.clone().unwrap_or_else(|| pvc.clone()),
                include,
                path: volume_path(t.path.as_deref().unwrap_or(""), "spec.target.path")?,
                mode: t.mode.unwrap_or_default(),
            })
        }
        (None, Some(c)) => {
            let (kind, name) = c.owner.split_once('/').filter(|(k, n)| !k.is_empty() && !n.is_empty()).ok_or_else(|| {
                Finding::new(
                    INVALID_RESTORE,
                    format!("spec.source.command.owner: {:?} is not <Kind>/<name> (e.g. StatefulSet/pg)", c.owner),
                )
            })?;
            if !s.include.is_empty() || t.path.is_some() || t.pvc.is_some() || t.mode.is_some() {
                return Err(Finding::new(
                    INVALID_RESTORE,
                    "spec.source.command: a command's snapshot is one stream; include, target.pvc, target.path and target.mode do not apply (target.pod does)",
                ));
            }
            What::Command(CommandRestore {
                owner_kind: kind.to_string(),
                owner_name: name.to_string(),
                container: c.container.clone().filter(|c| !c.is_empty()),
                target_pod: t.pod.clone().filter(|p| !p.is_empty()),
            })
        }
        _ => {
            return Err(Finding::new(
                INVALID_RESTORE,
                "spec.source: set exactly one of pvc and command",
            ));
        }
    };
    Ok(Checked {
        source_namespace,
        what,
        wanted,
        allow_partial: s.allow_partial == Some(true),
    })
}

/// Whether a snapshot's backup could not read every file (restic exit 3).
pub fn is_partial(s: &pb::Snapshot) -> bool {
    s.tags.iter().any(|t| t == TAG_PARTIAL)
}

/// The snapshot `wanted` names among `snaps` (one identity's): the newest, the one with that id,
/// or the newest taken at or before the time. `latest` and `before` pass over partial snapshots
/// unless `allow_partial`; an id is taken as named.
pub fn choose<'a>(
    snaps: &'a [pb::Snapshot],
    wanted: &Wanted,
    allow_partial: bool,
) -> Option<&'a pb::Snapshot> {
    let time = |s: &pb::Snapshot| DateTime::parse_from_rfc3339(&s.time).ok();
    let eligible = |s: &&pb::Snapshot| allow_partial || !is_partial(s);
    match wanted {
        Wanted::Latest => snaps
            .iter()
            .filter(eligible)
            .filter(|s| time(s).is_some())
            .max_by_key(|s| time(s)),
        Wanted::Id(id) => snaps.iter().find(|s| s.id.starts_with(id.as_str())),
        Wanted::Before(t) => snaps
            .iter()
            .filter(eligible)
            .filter(|s| time(s).is_some_and(|st| st <= *t))
            .max_by_key(|s| time(s)),
    }
}

/// Why nothing was chosen, with the partial snapshots passed over and the remedy.
fn describe(snaps: &[pb::Snapshot], wanted: &Wanted, allow_partial: bool) -> String {
    let what = match wanted {
        Wanted::Latest => "no complete snapshot".into(),
        Wanted::Id(id) => return format!("no snapshot {id}"),
        Wanted::Before(t) => format!("no complete snapshot taken at or before {}", t.to_rfc3339()),
    };
    let partial = snaps.iter().filter(|s| is_partial(s)).count();
    if allow_partial || partial == 0 {
        return what.replacen("complete ", "", 1);
    }
    format!(
        "{what} ({partial} partial snapshot(s) passed over: their backups could not read every file; set spec.source.allowPartial: true, or name one in spec.source.snapshot, to restore one)"
    )
}

pub async fn execute(ctx: Arc<Ctx>, run: Arc<Restore>) -> Result<(), kube::Error> {
    let Some(begun) = begin(ctx.as_ref(), run.as_ref()).await? else {
        return Ok(());
    };
    let outcome = restore(&ctx, &run, &begun).await;
    match outcome {
        Ok(finding) => {
            begun
                .finish(ctx.as_ref(), run.as_ref(), RunPhase::Succeeded, &finding)
                .await
        }
        Err(finding) => {
            let error = crate::errors::bounded(&finding.message, crate::errors::ITEM_ERROR_MAX);
            begun.status.run(move |s| {
                let r = s.restore.get_or_insert_with(Default::default);
                r.error = Some(error);
                r.percent_done = None;
            });
            begun
                .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &finding)
                .await
        }
    }
    Ok(())
}

async fn restore(ctx: &Arc<Ctx>, run: &Arc<Restore>, begun: &Begun) -> Result<Finding, Finding> {
    let namespace = run.namespace().unwrap_or_default();
    let mut checked = check(run, &namespace, ctx.config.allow_cross_namespace_restore)?;
    // A run resumed after a coordinator restart. Its snapshot, once recorded, is the one restored:
    // resolving `latest` again could pick a backup taken meanwhile, of the very damage being
    // repaired.
    let recorded = begun
        .resumed
        .then(|| begun.before.restore.as_ref()?.snapshot_id.clone())
        .flatten();
    if let Some(id) = recorded {
        if matches!(checked.what, What::Command(_)) {
            // The dump may have been streamed in part: a database that applied part of it must
            // not receive it all again.
            return Err(Finding::new(
                COMMAND_NOT_RESUMED,
                format!(
                    "the coordinator restarted while this command restore ran; the restore command may have applied part of the dump of snapshot {id}, so it is not streamed again: check the target, then create a new Restore"
                ),
            ));
        }
        checked.wanted = Wanted::Id(id);
        checked.allow_partial = true;
    }
    let mut repository = begun.repository.clone();
    // Never create a repository to restore from.
    repository.auto_init = false;
    match &checked.what {
        What::Volume(v) => restore_volume(ctx, run, begun, &checked, v, repository).await,
        What::Command(c) => restore_command(ctx, run, begun, &checked, c, repository).await,
    }
}

/// Lists the source's snapshots through the agent of `node`, picks the wanted one and records it in
/// the status (written before anything is restored).
async fn resolve(
    ctx: &Ctx,
    run: &Restore,
    status: &StatusHandle,
    node: &str,
    req: SnapshotsRequest,
    checked: &Checked,
    whose: &str,
) -> Result<pb::Snapshot, Finding> {
    let (wanted, allow_partial) = (&checked.wanted, checked.allow_partial);
    let snaps = dispatch::snapshots(&ctx.agents, node, req, SNAPSHOTS_TIMEOUT)
        .await
        .map_err(|e| {
            Finding::new(
                RESTORE_FAILED,
                format!("listing the snapshots of {whose}: {e}"),
            )
        })?;
    let chosen = choose(&snaps, wanted, allow_partial)
        .cloned()
        .ok_or_else(|| {
            Finding::new(
                SNAPSHOT_NOT_FOUND,
                format!(
                    "spec.source: {} of {whose} in the repository ({} snapshot(s) of it)",
                    describe(&snaps, wanted, allow_partial),
                    snaps.len()
                ),
            )
        })?;
    let (id, time, partial) = (chosen.id.clone(), chosen.time.clone(), is_partial(&chosen));
    status.run(move |s| {
        let r = s.restore.get_or_insert_with(Default::default);
        r.snapshot_id = Some(id);
        r.snapshot_time = Some(time);
        r.partial = Some(partial);
    });
    status.flush().await.map_err(|e| {
        Finding::new(
            RESTORE_FAILED,
            format!(
                "recording the snapshot in the status failed, so nothing was restored: {}",
                crate::errors::sentence(&e)
            ),
        )
    })?;
    ctx.notifier
        .normal(
            run,
            "Restore",
            &Finding::new(
                "SnapshotResolved",
                format!(
                    "restoring snapshot {} of {whose}, taken {}",
                    chosen.short_id, chosen.time
                ),
            ),
        )
        .await;
    Ok(chosen)
}

/// Progress into the status: percent done, and why it waits when it does.
fn on_progress<'a>(
    ctx: &'a Arc<Ctx>,
    run: &'a Arc<Restore>,
    status: &'a StatusHandle,
) -> impl FnMut(&pb::Progress) + 'a {
    let mut waiting = false;
    move |p: &pb::Progress| {
        let message = super::lock_news(ctx, run, p)
            .or_else(|| (p.phase == pb::Phase::Queued as i32).then(|| p.message.clone()));
        if message.is_some() || waiting {
            waiting = message.is_some();
            status.run(move |s| s.message = message);
        }
        if p.percent_done > 0.0 || p.bytes_done > 0 {
            let (percent, bytes) = (p.percent_done, p.bytes_done);
            status.run(move |s| {
                let r = s.restore.get_or_insert_with(Default::default);
                if percent > 0.0 {
                    r.percent_done = Some((percent * 1000.0).round() / 10.0);
                    s.summary = Some(format!("{:.0}%", percent * 100.0));
                } else {
                    s.summary = Some(format!("{} streamed", human_bytes(bytes)));
                }
            });
        }
    }
}

/// Where a PVC can be written: a running pod that mounts it (on a node with an agent, if any does).
fn mounted_by(ctx: &Ctx, namespace: &str, pvc: &str) -> Option<(String, String, String)> {
    let ready = ctx.agents.ready_nodes();
    let mut users: Vec<(String, String, String)> = ctx
        .stores
        .pods
        .in_namespace(namespace)
        .into_iter()
        .map(|p| PodInfo::clone(&p))
        .filter(|p| p.running && p.claims.iter().any(|c| c == pvc))
        // Another run's holder mounts the volume read-only (a backup's), or is about to go away.
        .filter(|p| {
            !p.labels
                .contains_key(crate::mount_holder::LABEL_MOUNT_HOLDER)
        })
        .filter_map(|p| Some((p.node?, p.name, p.uid)))
        .collect();
    users.sort_by_key(|(node, name, _)| (!ready.contains(node), name.clone()));
    users.into_iter().next()
}

async fn restore_volume(
    ctx: &Arc<Ctx>,
    run: &Arc<Restore>,
    begun: &Begun,
    checked: &Checked,
    what: &VolumeRestore,
    repository: pb::Repository,
) -> Result<Finding, Finding> {
    let VolumeRestore {
        pvc,
        target_pvc,
        include,
        path,
        mode,
    } = what;
    let namespace = run.namespace().unwrap_or_default();
    let status = &begun.status;
    let claim = ctx.stores.pvcs.get(&namespace, target_pvc).ok_or_else(|| {
        Finding::new(
            TARGET_NOT_FOUND,
            format!("spec.target.pvc: PVC {namespace}/{target_pvc} not found"),
        )
    })?;
    let pv = claim.volume_name.clone().ok_or_else(|| {
        Finding::new(
            TARGET_NOT_FOUND,
            format!("spec.target.pvc: PVC {namespace}/{target_pvc} is not bound to a volume yet"),
        )
    })?;
    let mounted = mounted_by(ctx, &namespace, target_pvc);
    let lister = match &mounted {
        Some((node, _, _)) => node.clone(),
        None => ctx.agents.ready_nodes().first().cloned().ok_or_else(|| {
            Finding::new(
                super::maintenance::NO_AGENT,
                "no ready Stowage agent to read the repository",
            )
        })?,
    };
    let source_ns = checked.source_namespace.clone();
    let identity = pb::VolumeIdentity {
        namespace: source_ns.clone(),
        pvc: pvc.clone(),
        pod_name: String::new(),
    };
    let whose = format!("{source_ns}/{pvc}");
    let mode_proto = match mode {
        RestoreMode::Merge => pb::RestoreMode::Merge,
        RestoreMode::Replace => pb::RestoreMode::Replace,
        RestoreMode::IntoEmpty => pb::RestoreMode::IntoEmpty,
    };
    {
        let (target_pvc, path, mode) = (target_pvc.clone(), path.clone(), *mode);
        status.run(move |s| {
            let r = s.restore.get_or_insert_with(Default::default);
            r.pvc = Some(target_pvc);
            r.path = Some(format!("/{path}"));
            r.mode = Some(mode);
        });
    }
    let snapshot = resolve(
        ctx,
        run,
        status,
        &lister,
        SnapshotsRequest {
            repository: Some(repository.clone()),
            identity: Some(identity.clone()),
            command: None,
        },
        checked,
        &whose,
    )
    .await?;

    let (node, pod, pod_uid, holder) = match mounted {
        Some((node, pod, uid)) => (node, pod, uid, None),
        None => {
            let h = mount_holder::hold(
                &ctx.client,
                &ctx.stores.pods,
                run.as_ref(),
                target_pvc,
                &mount_holder::Settings::of(&ctx.config),
                false,
            )
            .await
            .map_err(|m| Finding::new(RESTORE_FAILED, m))?;
            (h.node, h.pod.clone(), h.uid, Some(h.pod))
        }
    };
    {
        let (node, pod) = (node.clone(), pod.clone());
        status.run(move |s| {
            let r = s.restore.get_or_insert_with(Default::default);
            r.node = Some(node);
            r.pod = Some(pod);
        });
    }
    let req = RestoreRequest {
        run_id: run_id(run.as_ref()),
        repository: Some(repository),
        source: Some(identity),
        snapshot: snapshot.id.clone(),
        include: include.clone(),
        target: Some(pb::VolumeRef {
            pod_uid,
            volume_name: pv,
        }),
        target_path: path.clone(),
        mode: mode_proto.into(),
        target_namespace: namespace.clone(),
    };
    // One restore at a time per PVC, cluster-wide (a shared volume is mounted on several nodes).
    if ctx.restore_targets.busy(&namespace, target_pvc) {
        let message = format!("waiting for another Restore into PVC {target_pvc} to finish");
        status.run(move |s| s.message = Some(message));
    }
    let _turn = ctx.restore_targets.lock(&namespace, target_pvc).await;
    status.run(|s| s.message = None);
    let mut inventory = mount_holder::InventoryWait::default();
    let result = loop {
        let r = dispatch::restore_volume(
            &ctx.agents,
            &node,
            req.clone(),
            on_progress(ctx, run, status),
        )
        .await;
        if inventory
            .again(holder.is_some(), r.as_ref().err().map(|(e, _)| e))
            .await
        {
            continue;
        }
        break r;
    };
    if let Some(h) = &holder {
        mount_holder::release(&ctx.client, &namespace, h).await;
    }
    let r = result.map_err(|(e, _)| {
        tracing::warn!(run = %run_id(run.as_ref()), node = %node, error = %e, "restore failed");
        Finding::new(
            RESTORE_FAILED,
            format!(
                "restoring snapshot {} of {whose} into {namespace}/{target_pvc}: {e}",
                snapshot.short_id
            ),
        )
    })?;
    let shown_path = format!("/{path}");
    let finding = Finding::new(
        "Restored",
        format!(
            "restored snapshot {} of {whose} into {namespace}/{target_pvc}:{shown_path} on {node} ({mode:?}): {} file(s), {} director(ies), {} in {:.1}s",
            snapshot.short_id,
            r.files_restored,
            r.dirs_restored,
            human_bytes(r.bytes_restored),
            r.duration_seconds
        ),
    );
    status.run(move |s| {
        let o = s.restore.get_or_insert_with(RestoreOutcome::default);
        o.files_restored = Some(r.files_restored);
        o.dirs_restored = Some(r.dirs_restored);
        o.bytes_restored = Some(r.bytes_restored);
        o.duration_seconds = Some(r.duration_seconds);
        o.percent_done = Some(100.0);
        s.summary = Some("100%".into());
        s.message = None;
    });
    Ok(finding)
}

/// The pod that receives a command restore: the named one, else the oldest ready pod of the owner
/// that has a restore command.
fn target_pod(
    pods: &[PodInfo],
    kind: &str,
    name: &str,
    wanted: Option<&str>,
) -> Result<PodInfo, Finding> {
    if let Some(w) = wanted {
        return pods
            .iter()
            .find(|p| p.name == w && p.running)
            .cloned()
            .ok_or_else(|| {
                Finding::new(
                    TARGET_NOT_FOUND,
                    format!("spec.target.pod: pod {w} is not running"),
                )
            });
    }
    pods.iter()
        .filter(|p| {
            p.running
                && p.ready
                && p.node.is_some()
                && p.owner() == (kind.to_string(), name.to_string())
                && p.annotations.contains_key(ANNOTATION_RESTORE_COMMAND)
        })
        .min_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)))
        .cloned()
        .ok_or_else(|| {
            Finding::new(
                TARGET_NOT_FOUND,
                format!(
                    "spec.target.pod: no running and ready pod of {kind}/{name} has a {ANNOTATION_RESTORE_COMMAND} annotation; name one in spec.target.pod"
                ),
            )
        })
}

async fn restore_command(
    ctx: &Arc<Ctx>,
    run: &Arc<Restore>,
    begun: &Begun,
    checked: &Checked,
    what: &CommandRestore,
    repository: pb::Repository,
) -> Result<Finding, Finding> {
    let CommandRestore {
        owner_kind,
        owner_name,
        container,
        target_pod: wanted_pod,
    } = what;
    let namespace = run.namespace().unwrap_or_default();
    let status = &begun.status;
    let pods: Vec<PodInfo> = ctx
        .stores
        .pods
        .in_namespace(&namespace)
        .iter()
        .map(|p| PodInfo::clone(p))
        .collect();
    let pod = target_pod(&pods, owner_kind, owner_name, wanted_pod.as_deref())?;
    let command = pod
        .annotations
        .get(ANNOTATION_RESTORE_COMMAND)
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            Finding::new(
                NO_RESTORE_COMMAND,
                format!("pod {namespace}/{} has no {ANNOTATION_RESTORE_COMMAND} annotation: nothing to stream the dump into", pod.name),
            )
        })?;
    // The identity's container: the one the backup command ran in.
    let container = container
        .clone()
        .or_else(|| {
            pod.annotations
                .get(ANNOTATION_BACKUP_CONTAINER)
                .cloned()
                .filter(|c| !c.is_empty())
        })
        .or_else(|| pod.containers.first().cloned())
        .unwrap_or_default();
    let timeout_seconds = crate::run::backup::command_timeout(&pod).map_err(|m| {
        Finding::new(
            INVALID_RESTORE,
            format!(
                "pod {}: annotation {ANNOTATION_BACKUP_TIMEOUT}: {m}",
                pod.name
            ),
        )
    })?;
    let node = pod.node.clone().unwrap_or_default();
    let source = pb::CommandIdentity {
        namespace: checked.source_namespace.clone(),
        owner_kind: owner_kind.clone(),
        owner_name: owner_name.clone(),
        container: container.clone(),
    };
    let whose = format!(
        "the backup command of {}/{owner_kind}/{owner_name} (container {container})",
        checked.source_namespace
    );
    let item = CommandItem {
        owner: format!("{owner_kind}/{owner_name}"),
        container: container.clone(),
        command: crate::errors::bounded(&command, crate::errors::COMMAND_SHOWN_MAX),
        ..Default::default()
    };
    {
        let (node, pod, item) = (node.clone(), pod.name.clone(), item.clone());
        status.run(move |s| {
            let r = s.restore.get_or_insert_with(Default::default);
            r.node = Some(node);
            r.pod = Some(pod);
            r.command = Some(item);
        });
    }
    let snapshot = resolve(
        ctx,
        run,
        status,
        &node,
        SnapshotsRequest {
            repository: Some(repository.clone()),
            identity: None,
            command: Some(source.clone()),
        },
        checked,
        &whose,
    )
    .await?;
    let req = RestoreCommandRequest {
        run_id: run_id(run.as_ref()),
        repository: Some(repository),
        source: Some(source),
        snapshot: snapshot.id.clone(),
        pod: pod.name.clone(),
        container: container.clone(),
        command,
        timeout_seconds,
        target_namespace: namespace.clone(),
    };
    let result =
        dispatch::restore_command(&ctx.agents, &node, req, on_progress(ctx, run, status)).await;
    match result {
        Ok(r) => {
            let finding = Finding::new(
                "Restored",
                format!(
                    "streamed snapshot {} of {whose} ({}) into `{}` in {namespace}/{} on {node}; it exited 0 after {:.1}s",
                    snapshot.short_id,
                    human_bytes(r.stream_bytes),
                    item.command,
                    pod.name,
                    r.duration_seconds
                ),
            );
            status.run(move |s| {
                let o = s.restore.get_or_insert_with(RestoreOutcome::default);
                o.files_restored = Some(r.files_restored);
                o.bytes_restored = Some(r.bytes_restored);
                o.duration_seconds = Some(r.duration_seconds);
                if let Some(c) = o.command.as_mut() {
                    c.exit_code = Some(r.exit_code);
                    c.stream_bytes = Some(r.stream_bytes);
                }
                s.message = None;
            });
            Ok(finding)
        }
        Err((e, code)) => {
            status.run(move |s| {
                if let Some(c) = s.restore.as_mut().and_then(|o| o.command.as_mut()) {
                    c.exit_code = code;
                }
            });
            Err(Finding::new(RESTORE_FAILED, e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stowage_api::{CommandSourceRef, RestoreSource, RestoreSpec, RestoreTarget};

    fn restore(source: RestoreSource, target: RestoreTarget) -> Restore {
        Restore::new(
            "r",
            RestoreSpec {
                source,
                target,
                ..Default::default()
            },
        )
    }

    fn pvc_source(pvc: &str) -> RestoreSource {
        RestoreSource {
            pvc: Some(pvc.into()),
            ..Default::default()
        }
    }

    fn refused(r: &Restore, cross: bool) -> Finding {
        check(r, "shop", cross).expect_err("refused")
    }

    #[test]
    fn a_valid_volume_restore_is_normalised() {
        let r = restore(
            RestoreSource {
                include: vec!["/pgdata/base".into(), "./logs//x".into()],
                before: Some("2026-11-20T00:00:00Z".into()),
                ..pvc_source("data")
            },
            RestoreTarget {
                path: Some("/restored/".into()),
                mode: Some(RestoreMode::Replace),
                ..Default::default()
            },
        );
        let c = check(&r, "shop", false).unwrap();
        assert_eq!(c.source_namespace, "shop");
        assert!(matches!(c.wanted, Wanted::Before(_)));
        assert_eq!(
            c.what,
            What::Volume(VolumeRestore {
                pvc: "data".into(),
                target_pvc: "data".into(),
                include: vec!["pgdata/base".into(), "logs/x".into()],
                path: "restored".into(),
                mode: RestoreMode::Replace,
            })
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                restore(RestoreSource::default(), RestoreTarget::default()),
                "spec.source:",
            ),
            (
                restore(
                    RestoreSource {
                        snapshot: Some("abc".into()),
                        ..pvc_source("d")
                    },
                    RestoreTarget::default(),
                ),
                "spec.source.snapshot",
            ),
            (
                restore(
                    RestoreSource {
                        before: Some("yesterday".into()),
                        ..pvc_source("d")
                    },
                    RestoreTarget::default(),
                ),
                "spec.source.before",
            ),
            (
                restore(
                    RestoreSource {
                        include: vec!["ok".into(), "../../etc".into()],
                        ..pvc_source("d")
                    },
                    RestoreTarget::default(),
                ),
                "spec.source.include[1]",
            ),
            (
                restore(
                    pvc_source("d"),
                    RestoreTarget {
                        path: Some("a/../../b".into()),
                        ..Default::default()
                    },
                ),
                "spec.target.path",
            ),
            (
                restore(
                    RestoreSource {
                        command: Some(CommandSourceRef {
                            owner: "pg".into(),
                            container: None,
                        }),
                        ..Default::default()
                    },
                    RestoreTarget::default(),
                ),
                "spec.source.command.owner",
            ),
        ];
        for (r, field) in cases {
            let f = refused(&r, false);
            assert!(f.message.starts_with(field), "{field}: {}", f.message);
            assert_eq!(f.reason, INVALID_RESTORE);
        }
    }

    #[test]
    fn another_namespace_needs_the_flag() {
        let r = restore(
            RestoreSource {
                namespace: Some("bank".into()),
                ..pvc_source("d")
            },
            RestoreTarget::default(),
        );
        let f = refused(&r, false);
        assert_eq!(f.reason, CROSS_NAMESPACE);
        assert!(f.message.contains("bank"), "{}", f.message);
        assert_eq!(check(&r, "shop", true).unwrap().source_namespace, "bank");
    }

    fn snap(id: &str, time: &str) -> pb::Snapshot {
        pb::Snapshot {
            id: id.into(),
            short_id: id[..8].into(),
            time: time.into(),
            ..Default::default()
        }
    }

    #[test]
    fn choosing_latest_an_id_or_the_newest_before_a_time() {
        // restic writes local times with offsets: compare instants, not strings.
        let snaps = vec![
            snap("aaaaaaaa11", "2026-11-19T23:00:00+01:00"), // 22:00Z
            snap("bbbbbbbb22", "2026-11-19T22:30:00Z"),
            snap("cccccccc33", "2026-11-20T08:00:00+09:00"), // 23:00Z on the 19th
            snap("dddddddd44", "2026-11-21T00:00:00Z"),
        ];
        assert_eq!(
            choose(&snaps, &Wanted::Latest, false).unwrap().id,
            "dddddddd44"
        );
        assert_eq!(
            choose(&snaps, &Wanted::Id("bbbbbbbb".into()), false)
                .unwrap()
                .id,
            "bbbbbbbb22"
        );
        let before = |t: &str| Wanted::Before(DateTime::parse_from_rfc3339(t).unwrap());
        assert_eq!(
            choose(&snaps, &before("2026-11-20T00:00:00Z"), false)
                .unwrap()
                .id,
            "cccccccc33"
        );
        assert_eq!(
            choose(&snaps, &before("2026-11-19T22:30:00Z"), false)
                .unwrap()
                .id,
            "bbbbbbbb22",
            "at or before"
        );
        assert!(choose(&snaps, &before("2026-11-01T00:00:00Z"), false).is_none());
        assert!(choose(&snaps, &Wanted::Id("eeeeeeee".into()), false).is_none());
    }

    #[test]
    fn latest_and_before_pass_over_partial_snapshots_unless_allowed() {
        let mut partial = snap("eeeeeeee55", "2026-11-22T00:00:00Z");
        partial.tags = vec![TAG_PARTIAL.into()];
        let snaps = vec![snap("dddddddd44", "2026-11-21T00:00:00Z"), partial];
        assert_eq!(
            choose(&snaps, &Wanted::Latest, false).unwrap().id,
            "dddddddd44"
        );
        assert_eq!(
            choose(&snaps, &Wanted::Latest, true).unwrap().id,
            "eeeeeeee55"
        );
        let before = Wanted::Before(DateTime::parse_from_rfc3339("2026-11-23T00:00:00Z").unwrap());
        assert_eq!(choose(&snaps, &before, false).unwrap().id, "dddddddd44");
        // Named, a partial snapshot is taken as named.
        assert_eq!(
            choose(&snaps, &Wanted::Id("eeeeeeee".into()), false)
                .unwrap()
                .id,
            "eeeeeeee55"
        );
        let only_partial = &snaps[1..];
        assert!(choose(only_partial, &Wanted::Latest, false).is_none());
        let why = describe(only_partial, &Wanted::Latest, false);
        assert!(
            why.starts_with("no complete snapshot (1 partial snapshot(s) passed over")
                && why.contains("spec.source.allowPartial: true"),
            "{why}"
        );
        assert_eq!(describe(&[], &Wanted::Latest, false), "no snapshot");
    }
}
