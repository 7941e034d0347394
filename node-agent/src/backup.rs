//! Backing up one volume: resolve it in the inventory, wait for a slot, open the volume directory
//! (refusing a CSI volume that is no longer mounted, skipping an empty one), pick the parent snapshot
//! of the volume identity, run restic in a sandbox that holds only that directory, and report
//! progress and the result.

use std::time::Instant;

use restic_wrap::Error as ResticError;
use restic_wrap::options::{BackupOptions, SnapshotsOptions};
use restic_wrap::stream::BackupOutput;
use stowage_proto::v1::{
    BackupEvent, BackupRequest, BackupResult, ItemError, Outcome, Phase, Progress,
    backup_event::Event, backup_request::Source,
};
use tokio_util::sync::CancellationToken;

use crate::context::{AgentContext, ParentKey, ProgressSink};
use crate::error::AgentError;
use crate::identity::{Identity, TAG_RUN, validate_extra_tag};
use crate::inventory::VolumeEntry;
use crate::inventory::scan::CSI_PLUGIN;
use crate::memory::Operation;
use crate::{follow, mountpoint, repository, safe_fs, sandbox};
use restic_wrap::options::TagOptions;
use stowage_api::contract::TAG_PARTIAL;

/// `skipped_reason` of a volume with nothing in it.
pub const SKIPPED_EMPTY: &str = "EmptyVolume";

pub fn progress_event(p: Progress) -> BackupEvent {
    BackupEvent {
        event: Some(Event::Progress(p)),
    }
}

/// A validated request whose volume is on this node.
pub struct BackupPlan {
    req: BackupRequest,
    identity: Identity,
    repo: restic_wrap::Repository,
    volume: VolumeEntry,
}

/// The run id and extra tags of a backup request: they become snapshot tags.
pub fn validate_tags(req: &BackupRequest) -> Result<(), AgentError> {
    // The run id becomes a tag value (see TAG_RUN): restic splits tags at commas.
    if req.run_id.contains(',') || req.run_id.chars().any(char::is_control) {
        return Err(AgentError::InvalidArgument(format!(
            "run_id {:?} must not contain commas or control characters",
            req.run_id
        )));
    }
    for t in &req.extra_tags {
        validate_extra_tag(t).map_err(AgentError::InvalidArgument)?;
    }
    Ok(())
}

/// Checks the request and finds the volume; errors here are answered before any work starts.
pub fn plan(ctx: &AgentContext, req: BackupRequest) -> Result<BackupPlan, AgentError> {
    let identity = Identity::from_proto(req.identity.as_ref(), false)?;
    let repo = repository::from_proto(req.repository.as_ref(), &ctx.local_roots)?;
    validate_tags(&req)?;
    let vref = match &req.source {
        Some(Source::Volume(v)) => v.r#ref.clone(),
        Some(Source::Command(_)) | None => None,
    }
    .ok_or_else(|| AgentError::InvalidArgument("source.volume.ref is required".into()))?;
    let volume = ctx.volume(&vref)?;
    Ok(BackupPlan {
        req,
        identity,
        repo,
        volume,
    })
}

/// Runs a planned backup to its end. `cancel` fires when the client goes away or the agent shuts down.
pub async fn execute(
    ctx: &AgentContext,
    plan: BackupPlan,
    progress: ProgressSink,
    cancel: CancellationToken,
) -> Result<BackupResult, AgentError> {
    let BackupPlan {
        req,
        identity,
        repo,
        volume,
    } = plan;
    let repo_spec = req.repository.as_ref();
    let _slot = ctx
        .slot(
            Operation::Backup,
            &identity.namespace,
            &repo,
            &progress,
            &cancel,
        )
        .await?;
    let started = Instant::now();

    // From here on the volume is addressed through this descriptor, never by its name again.
    let root = safe_fs::open_root(&volume.data_dir)?;
    if volume.plugin == CSI_PLUGIN
        && !mountpoint::is_mount_root(&root).map_err(|source| AgentError::Io {
            context: format!("checking that {} is mounted", volume.data_dir.display()),
            source,
        })?
    {
        return Err(AgentError::NotMounted {
            dir: volume.data_dir.display().to_string(),
        });
    }
    if safe_fs::is_empty(&root)? {
        return Ok(skipped(&req.run_id, &identity, started, SKIPPED_EMPTY));
    }

    let restic = ctx.restic(repo, repo_spec, Some(progress.clone()));
    let auto_init = repo_spec.is_some_and(|r| r.auto_init);

    // restic picks a parent by host and absolute path; the path contains the pod UID and so changes
    // when a pod is recreated. We pick the identity's newest snapshot ourselves, remembering the one
    // we made last so a steady-state backup costs a single restic run.
    let cache_key = ParentKey {
        repository: restic.repository().location(),
        identity: identity.host(),
    };
    let remembered = ctx.parents.get(&cache_key);
    let lookup = || async {
        tokio::select! {
            p = find_parent(&restic, &identity, auto_init) => p.map_err(AgentError::from),
            _ = cancel.cancelled() => Err(AgentError::Cancelled),
        }
    };
    let parent = match &remembered {
        Some(p) => Some(p.clone()),
        None => lookup().await?,
    };

    let mut tags = identity.backup_tags();
    if !req.run_id.is_empty() {
        // Lets a coordinator that restarted mid-run see which volumes this run already backed up.
        tags.push(format!("{TAG_RUN}={}", req.run_id));
    }
    tags.extend(req.extra_tags.iter().cloned());
    let mut opts = BackupOptions {
        // Relative to the volume directory: the snapshot tree holds the volume's contents, with no
        // node-specific prefix, so restores can land anywhere.
        paths: vec![".".into()],
        host: Some(identity.host()),
        tags,
        parent,
        // A restore's staging directory (at the volume root) is never part of a backup.
        excludes: req
            .excludes
            .iter()
            .cloned()
            .chain([format!("{}/{}*", sandbox::VOLUME, crate::staging::PREFIX)])
            .collect(),
        ..Default::default()
    };
    tracing::info!(
        run = %req.run_id, namespace = %identity.namespace, pvc = %identity.pvc,
        dir = %volume.data_dir.display(), parent = ?opts.parent, "backup started"
    );
    let tmp = sandbox::OperationTmp::create(&ctx.cache_dir)?;
    let restic =
        restic
            .clone()
            .with_sandbox(sandbox::for_backup(ctx, &root, restic.repository(), &tmp)?);
    let run = |opts: BackupOptions| {
        let (restic, dir, progress, cancel) = (
            &restic,
            std::path::Path::new(sandbox::VOLUME),
            &progress,
            &cancel,
        );
        async move {
            restic
                .with_lock_retry(|| attempt(ctx, restic, &opts, dir, progress, cancel))
                .await
        }
    };
    let mut outcome = run(opts.clone()).await;
    if remembered.is_some() && matches!(outcome, Err(ResticError::CommandFailed { .. })) {
        // The remembered parent may have been removed by a prune since: look it up and retry once.
        ctx.parents.forget(&cache_key);
        opts.parent = lookup().await?;
        outcome = run(opts.clone()).await;
    }
    let parent = opts.parent;
    let duration = started.elapsed().as_secs_f64();
    ctx.metrics.backup_duration.observe(duration);

    let (summary, outcome_kind, errors) = match outcome {
        Ok(BackupOutput { summary }) => (summary, Outcome::Succeeded, Vec::new()),
        Err(ResticError::PartialBackup { summary, errors }) => (*summary, Outcome::Partial, errors),
        // Not empty when we looked, but nothing left to store (everything excluded, or emptied).
        Err(ResticError::EmptySource) => {
            return Ok(skipped(&req.run_id, &identity, started, SKIPPED_EMPTY));
        }
        Err(ResticError::Cancelled { .. }) => return Err(AgentError::Cancelled),
        Err(e) => return Err(e.into()),
    };
    let mut summary = summary;
    if outcome_kind == Outcome::Partial {
        // Mark the snapshot incomplete in the repository itself, so that a coordinator resuming
        // this run after a restart never counts it as a good backup. restic rewrites it under a
        // new id. If marking fails, the result still says Partial; only a crash before the
        // coordinator records it would lose that.
        let mark = TagOptions {
            add: vec![TAG_PARTIAL.to_string()],
            snapshot: summary.snapshot_id.clone(),
        };
        match restic.tag(&mark).await {
            Ok(id) => summary.snapshot_id = id,
            Err(e) => tracing::warn!(
                run = %req.run_id, snapshot = %summary.snapshot_id, error = %e,
                "could not tag the incomplete snapshot as partial"
            ),
        }
    }
    ctx.parents.remember(cache_key, summary.snapshot_id.clone());
    ctx.metrics.backup_bytes_added.inc_by(summary.data_added);
    if outcome_kind == Outcome::Succeeded {
        ctx.metrics
            .record_success(&identity.namespace, &identity.pvc);
    }
    tracing::info!(
        run = %req.run_id, namespace = %identity.namespace, pvc = %identity.pvc,
        snapshot = %summary.snapshot_id, outcome = ?outcome_kind, files_new = summary.files_new,
        files_changed = summary.files_changed, files_unmodified = summary.files_unmodified,
        bytes_added = summary.data_added, duration_secs = duration, "backup finished"
    );
    Ok(BackupResult {
        outcome: outcome_kind.into(),
        snapshot_id: summary.snapshot_id,
        parent_snapshot_id: parent.unwrap_or_default(),
        files_new: summary.files_new,
        files_changed: summary.files_changed,
        files_unmodified: summary.files_unmodified,
        dirs_new: summary.dirs_new,
        dirs_changed: summary.dirs_changed,
        dirs_unmodified: summary.dirs_unmodified,
        data_added_bytes: summary.data_added,
        total_files_processed: summary.total_files_processed,
        total_bytes_processed: summary.total_bytes_processed,
        duration_seconds: duration,
        errors: errors
            .into_iter()
            .map(|e| ItemError {
                item: e.item.trim_start_matches("./").to_string(),
                during: e.during,
                message: e.message,
            })
            .collect(),
        skipped_reason: String::new(),
        ..Default::default()
    })
}

/// The result for a volume with nothing to back up: no restic run, no snapshot, not a failure.
fn skipped(run_id: &str, identity: &Identity, started: Instant, reason: &str) -> BackupResult {
    tracing::info!(
        run = %run_id, namespace = %identity.namespace, pvc = %identity.pvc, reason,
        "backup skipped: the volume is empty"
    );
    BackupResult {
        outcome: Outcome::Skipped.into(),
        skipped_reason: reason.to_string(),
        duration_seconds: started.elapsed().as_secs_f64(),
        ..Default::default()
    }
}

/// The identity's newest snapshot; creates the repository first when it is missing and the request
/// allows it (then there is no parent).
async fn find_parent(
    restic: &restic_wrap::Restic,
    identity: &Identity,
    auto_init: bool,
) -> restic_wrap::Result<Option<String>> {
    let opts = SnapshotsOptions {
        tags: identity.selector_tags(),
        ..Default::default()
    };
    match restic.snapshots(&opts).await {
        Ok(snaps) => Ok(restic_wrap::json::Snapshot::newest(snaps).map(|s| s.id)),
        Err(ResticError::RepositoryNotFound { .. }) if auto_init => {
            restic.ensure_repository(true).await?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// One restic run; repeated by the lock policy when the repository is locked.
async fn attempt(
    ctx: &AgentContext,
    restic: &restic_wrap::Restic,
    opts: &BackupOptions,
    dir: &std::path::Path,
    progress: &ProgressSink,
    cancel: &CancellationToken,
) -> restic_wrap::Result<BackupOutput> {
    let mut run = restic.backup(opts, dir)?;
    tracing::debug!(pid = ?run.pid(), "restic backup spawned");
    progress.phase(Phase::Running, "restic started");
    let mut bytes_seen = 0u64;
    follow::follow(&mut run, cancel, "backup", |s| {
        // Progress lines become metrics as well as messages.
        ctx.metrics
            .backup_bytes_processed
            .inc_by(s.bytes_done.saturating_sub(bytes_seen));
        bytes_seen = bytes_seen.max(s.bytes_done);
        progress.send(Progress {
            phase: Phase::Running.into(),
            percent_done: s.percent_done,
            total_files: s.total_files,
            files_done: s.files_done,
            total_bytes: s.total_bytes,
            bytes_done: s.bytes_done,
            seconds_elapsed: s.seconds_elapsed,
            seconds_remaining: s.seconds_remaining,
            ..Default::default()
        });
    })
    .await?;
    follow::finish(run.finish(), cancel, "backup").await
}
