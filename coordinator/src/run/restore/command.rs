//! A backup command's snapshot streamed into the restore command of a running pod of its owner.

use std::sync::Arc;

use kube::ResourceExt;
use stowage_api::contract::{
    ANNOTATION_BACKUP_CONTAINER, ANNOTATION_BACKUP_TIMEOUT, ANNOTATION_RESTORE_COMMAND,
};
use stowage_proto::v1::{self as pb, RestoreCommandRequest, SnapshotsRequest};

use super::*;
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::dispatch;
use crate::plan::PodInfo;
use crate::run::maintenance::human_bytes;
use crate::run::{Begun, run_id};
use stowage_api::{CommandItem, Restore, RestoreOutcome};

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

pub(super) async fn restore_command(
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
