//! Restore runs: find where the target lives, resolve the snapshot among the source's own (and
//! record it before anything is written), then ask the agent of the target's node to write it:
//! into the volume while its pods run (an unmounted PVC gets a read-write mount holder), or, for a
//! backup command's snapshot, into the target pod's restore command.
//!
//! - [`spec`]: the Restore's spec, checked (every field a message can name);
//! - [`snapshot`]: which snapshot is restored, chosen and recorded before anything is written;
//! - [`volume`]: a PVC's snapshot into its live volume (or through a mount holder);
//! - [`command`]: a backup command's dump streamed into a pod's restore command.

mod command;
mod snapshot;
mod spec;
mod volume;

use command::restore_command;
use snapshot::resolve;
use spec::{Checked, CommandRestore, VolumeRestore, Wanted, What, check};
use volume::restore_volume;

use std::sync::Arc;

use kube::ResourceExt;
use stowage_proto::v1::{self as pb};

use crate::conditions::Finding;
use crate::context::Ctx;
use crate::run::maintenance::human_bytes;
use crate::run::status::StatusHandle;
use crate::run::{Begun, begin};
use stowage_api::{Restore, RunPhase};

pub const INVALID_RESTORE: &str = "InvalidRestore";
pub const CROSS_NAMESPACE: &str = "CrossNamespaceRefused";
pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
pub const SNAPSHOT_NOT_FOUND: &str = "SnapshotNotFound";
pub const NO_RESTORE_COMMAND: &str = "NoRestoreCommand";
pub const RESTORE_FAILED: &str = "RestoreFailed";
pub const COMMAND_NOT_RESUMED: &str = "CommandRestoreInterrupted";

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
