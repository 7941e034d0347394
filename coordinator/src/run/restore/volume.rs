//! A PVC's snapshot into its live volume, by the agent of the node where a pod mounts it (or where
//! a read-write mount holder does), with progress in the status.

use std::sync::Arc;

use kube::ResourceExt;
use stowage_proto::v1::{self as pb, RestoreRequest, SnapshotsRequest};

use super::*;
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::dispatch;
use crate::mount_holder;
use crate::run::maintenance::human_bytes;
use crate::run::{Begun, run_id};
use stowage_api::{PreviewSet, Restore, RestoreMode, RestoreOutcome, RestorePreview};

/// Where a PVC can be written: a running pod that mounts it (on a node with an agent, if any does).
fn mounted_by(ctx: &Ctx, namespace: &str, pvc: &str) -> Option<(String, String, String)> {
    let ready = ctx.agents.ready_nodes();
    let mut users: Vec<(String, String, String)> = ctx
        .stores
        .pods
        .in_namespace(namespace)
        .iter()
        .filter(|p| p.running && p.claims.iter().any(|c| c == pvc))
        // Another run's holder mounts the volume read-only (a backup's), or is about to go away.
        .filter(|p| {
            !p.labels
                .contains_key(crate::mount_holder::LABEL_MOUNT_HOLDER)
        })
        .filter_map(|p| Some((p.node.clone()?, p.name.clone(), p.uid.clone())))
        .collect();
    users.sort_by_key(|(node, name, _)| (!ready.contains(node), name.clone()));
    users.into_iter().next()
}

pub(super) async fn restore_volume(
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
    let dry_run = run.spec.dry_run == Some(true);
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
                crate::run::maintenance::NO_AGENT,
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
            // A dry run reads the volume only: its holder mounts it read-only.
            let h = mount_holder::hold(
                &ctx.client,
                &ctx.stores.pods,
                run.as_ref(),
                target_pvc,
                &mount_holder::Settings::of(&ctx.config),
                dry_run,
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
        dry_run,
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
    if let Some(preview) = r.preview.filter(|_| dry_run) {
        let preview = preview_status(preview);
        let finding = Finding::new(
            PREVIEWED,
            format!(
                "dry run, nothing written: restoring snapshot {} of {whose} into {namespace}/{target_pvc}:{shown_path} on {node} ({mode:?}) would add {} entr(ies) ({}), change {} file(s) ({}) and delete {} entr(ies); {} unchanged",
                snapshot.short_id,
                preview.added.entries,
                human_bytes(preview.added.bytes),
                preview.changed.entries,
                human_bytes(preview.changed.bytes),
                preview.deleted.entries,
                preview.unchanged,
            ),
        );
        status.run(move |s| {
            let o = s.restore.get_or_insert_with(RestoreOutcome::default);
            o.preview = Some(preview);
            o.duration_seconds = Some(r.duration_seconds);
            o.percent_done = Some(100.0);
            s.summary = Some("previewed".into());
            s.message = None;
        });
        return Ok(finding);
    }
    if dry_run {
        // An agent that does not know dry runs would have restored: say so loudly.
        return Err(Finding::new(
            RESTORE_FAILED,
            format!(
                "spec.dryRun: the agent on {node} answered without a preview; it may predate dry runs (update the agents)"
            ),
        ));
    }
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

/// The reason of a dry run that found what a restore would do.
pub const PREVIEWED: &str = "Previewed";

/// The agent's preview as the Restore's status shows it (the agent bounds the path lists).
fn preview_status(p: pb::RestorePreview) -> RestorePreview {
    let set = |s: Option<pb::PreviewSet>| {
        let s = s.unwrap_or_default();
        PreviewSet {
            entries: s.entries,
            bytes: s.bytes,
            paths: s
                .paths
                .iter()
                .take(MAX_PREVIEW_PATHS)
                .map(|p| crate::errors::bounded(p, 600))
                .collect(),
        }
    };
    RestorePreview {
        added: set(p.added),
        changed: set(p.changed),
        deleted: set(p.deleted),
        unchanged: p.unchanged,
    }
}

/// Paths per kind in a preview's status, whatever an agent sends.
const MAX_PREVIEW_PATHS: usize = 100;
