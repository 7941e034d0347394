//! Verification drills: proof that an identity's newest complete snapshot comes back.
//!
//! - A volume's snapshot is restored with `restic restore --verify` (restic re-reads every file it
//!   wrote and compares it with the snapshot) into a scratch directory under the agent's cache,
//!   in the restore sandbox, then counted and removed. With a sample bound, the drill restores only
//!   the files of a rotating window ([`crate::verify_sample`]); the next drill starts where this one
//!   ended.
//! - A backup command's snapshot is one file: `restic dump` streams it through SHA-256, never to
//!   disk. restic checks every blob it reads, so a damaged pack fails the dump.
//!
//! A drill ranks below every other operation ([`crate::limiter`]): when one queues, the drill gives
//! its slot up (its restic is stopped and its scratch removed) and starts over once it gets a slot
//! again. Scratch space is bounded by the cache filesystem's free space less a reserve, counting the
//! drills already running on this node; a drill that does not fit fails with a sentence.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use restic_wrap::json::Snapshot;
use restic_wrap::options::{DumpOptions, LsOptions, RestoreOptions};
use sha2::Digest;
use stowage_proto::v1::{
    Phase, Progress, VerifyEvent, VerifyRequest, VerifyResult, VerifySample, verify_event::Event,
    verify_request::Source,
};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::context::{AgentContext, ProgressSink};
use crate::error::AgentError;
use crate::identity::{CommandIdentity, Identity};
use crate::memory::Operation;
use crate::restore::{Whose, resolve_snapshot};
use crate::safe_fs::{self, MergeStats};
use crate::verify_sample::{Sample, Sampler};
use crate::verify_scratch::{Running, reserve};
use crate::{follow, repository, sandbox};

/// Where the include file of a sample is bound inside the sandbox.
const INCLUDE_FILE: &str = "/stowage-verify-include";
/// How long a drill that waits for queued operations sleeps between looks.
const OUTRANKED_POLL: Duration = Duration::from_millis(250);

pub fn progress_event(p: Progress) -> VerifyEvent {
    VerifyEvent {
        event: Some(Event::Progress(p)),
    }
}

pub fn result_event(r: VerifyResult) -> VerifyEvent {
    VerifyEvent {
        event: Some(Event::Result(r)),
    }
}

enum Target {
    Volume(Identity),
    Command(CommandIdentity),
}

/// A validated request.
pub struct VerifyPlan {
    req: VerifyRequest,
    target: Target,
    repo: restic_wrap::Repository,
}

/// Checks the request; errors here are answered before any work starts.
pub fn plan(ctx: &AgentContext, req: VerifyRequest) -> Result<VerifyPlan, AgentError> {
    let repo = repository::from_proto(req.repository.as_ref(), &ctx.local_roots)?;
    let target = match &req.source {
        Some(Source::Volume(v)) => Target::Volume(Identity::from_proto(Some(v), false)?),
        Some(Source::Command(c)) => Target::Command(CommandIdentity::new(
            &c.namespace,
            &c.owner_kind,
            &c.owner_name,
            &c.container,
            "any",
        )?),
        None => {
            return Err(AgentError::InvalidArgument(
                "a drill needs a volume or a command identity".into(),
            ));
        }
    };
    Ok(VerifyPlan { req, target, repo })
}

/// Runs the drill: waits for a slot below everything else, gives it up (and starts over) whenever
/// another operation queues for one.
pub async fn execute(
    ctx: &AgentContext,
    plan: VerifyPlan,
    progress: ProgressSink,
    cancel: CancellationToken,
) -> Result<VerifyResult, AgentError> {
    let started = Instant::now();
    let namespace = if plan.req.namespace.is_empty() {
        match &plan.target {
            Target::Volume(v) => v.namespace.clone(),
            Target::Command(c) => c.namespace.clone(),
        }
    } else {
        plan.req.namespace.clone()
    };
    let outranked = ctx.limiter.outranked();
    let mut yielded = 0u32;
    // A drill that keeps yielding still ends: within the agent's --max-duration, waits included.
    let deadline = tokio::time::Instant::now() + ctx.limits.max;
    let out_of_time = |yielded: u32| {
        AgentError::InvalidArgument(format!(
            "the drill did not finish within {} (--max-duration): it waited for or gave its slot to other operations ({yielded} time(s)); run it when the node is quieter",
            restic_wrap::error::human(ctx.limits.max)
        ))
    };
    loop {
        // Whatever queued first goes first: a drill does not even queue while others wait.
        while ctx.limiter.outranked_now() {
            tokio::select! {
                _ = tokio::time::sleep(OUTRANKED_POLL) => {}
                _ = tokio::time::sleep_until(deadline) => return Err(out_of_time(yielded)),
                _ = cancel.cancelled() => return Err(AgentError::Cancelled),
            }
        }
        let need = ctx.memory_estimate(Operation::Restore, &plan.repo);
        if let Some(why) = ctx.limiter.would_wait(&namespace, need) {
            progress.phase(Phase::Queued, why);
        }
        let slot = tokio::select! {
            s = ctx.limiter.acquire_quietly(&namespace, need) => s.ok_or(AgentError::ShuttingDown)?,
            _ = tokio::time::sleep_until(deadline) => return Err(out_of_time(yielded)),
            _ = cancel.cancelled() => return Err(AgentError::Cancelled),
        };
        let notified = outranked.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if ctx.limiter.outranked_now() {
            drop(slot);
            yielded += 1;
            continue;
        }
        let attempt = drill(ctx, &plan, &progress, &cancel);
        tokio::select! {
            r = attempt => {
                drop(slot);
                let mut r = r?;
                r.yielded = yielded;
                r.duration_seconds = started.elapsed().as_secs_f64();
                return Ok(r);
            }
            _ = tokio::time::sleep_until(deadline) => return Err(out_of_time(yielded)),
            _ = &mut notified => {
                // Dropping the attempt stops its restic and removes its scratch directory.
                yielded += 1;
                tracing::info!(run = %plan.req.run_id, yielded, "drill gave its slot to a queued operation; it starts over once it gets one again");
                progress.phase(
                    Phase::Queued,
                    format!("gave the slot to another operation ({yielded} time(s)); starting over when one is free"),
                );
                drop(slot);
            }
        }
    }
}

/// One attempt at the drill, holding a slot.
async fn drill(
    ctx: &AgentContext,
    plan: &VerifyPlan,
    progress: &ProgressSink,
    cancel: &CancellationToken,
) -> Result<VerifyResult, AgentError> {
    let restic = ctx.restic(
        plan.repo.clone(),
        plan.req.repository.as_ref(),
        Some(progress.clone()),
    );
    let whose = match &plan.target {
        Target::Volume(v) => Whose::volume(v),
        Target::Command(c) => Whose::command(c),
    };
    // The newest complete snapshot, as a restore of "latest" picks it (partial ones are skipped).
    let snapshot = tokio::select! {
        s = resolve_snapshot(ctx, &restic, &whose, "latest") => s?,
        _ = cancel.cancelled() => return Err(AgentError::Cancelled),
    };
    let read_only = restic
        .clone()
        .with_global(sandbox::read_only_globals(&restic));
    let r = match &plan.target {
        Target::Command(_) => dump_and_hash(ctx, &read_only, &snapshot, progress, cancel).await,
        Target::Volume(_) => {
            restore_and_verify(ctx, plan, &read_only, &snapshot, progress, cancel).await
        }
    };
    r.map_err(|e| match e {
        AgentError::Cancelled | AgentError::ShuttingDown => e,
        other => AgentError::DrillFailed {
            snapshot: snapshot.short_id.clone(),
            time: snapshot.time.clone(),
            message: other.to_string(),
        },
    })
}

async fn dump_and_hash(
    ctx: &AgentContext,
    restic: &restic_wrap::Restic,
    snapshot: &Snapshot,
    progress: &ProgressSink,
    cancel: &CancellationToken,
) -> Result<VerifyResult, AgentError> {
    let [path] = snapshot.paths.as_slice() else {
        return Err(AgentError::InvalidArgument(format!(
            "snapshot {} holds {} paths; a backup command's snapshot holds one file",
            snapshot.short_id,
            snapshot.paths.len()
        )));
    };
    progress.phase(
        Phase::Running,
        format!(
            "reading the dump of snapshot {} through SHA-256",
            snapshot.short_id
        ),
    );
    let restic = restic
        .clone()
        .with_sandbox(sandbox::for_dump(ctx, restic.repository()));
    let mut dump = restic.dump(&DumpOptions {
        snapshot: snapshot.id.clone(),
        path: path.clone(),
    })?;
    let mut output = dump
        .stdout()
        .ok_or_else(|| AgentError::InvalidArgument("restic dump has no stdout".into()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    let mut last_report = Instant::now();
    loop {
        let n = tokio::select! {
            n = output.read(&mut buf) => n.map_err(|source| AgentError::Io {
                context: "reading restic dump's output".into(),
                source,
            })?,
            _ = cancel.cancelled() => {
                dump.stop().await;
                return Err(AgentError::Cancelled);
            }
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            progress.send(Progress {
                phase: Phase::Running.into(),
                bytes_done: bytes,
                ..Default::default()
            });
        }
    }
    drop(output);
    tokio::select! {
        r = dump.finish() => r?,
        _ = cancel.cancelled() => return Err(AgentError::Cancelled),
    }
    let sha256 = format!("{:x}", hasher.finalize());
    tracing::info!(snapshot = %snapshot.id, bytes, sha256 = %sha256, "command dump verified");
    Ok(VerifyResult {
        snapshot_id: snapshot.id.clone(),
        snapshot_time: snapshot.time.clone(),
        files: 1,
        bytes,
        sha256,
        sample: Some(VerifySample {
            complete: true,
            first: path.clone(),
            last: path.clone(),
            snapshot_files: 1,
            ..Default::default()
        }),
        ..Default::default()
    })
}

async fn restore_and_verify(
    ctx: &AgentContext,
    plan: &VerifyPlan,
    restic: &restic_wrap::Restic,
    snapshot: &Snapshot,
    progress: &ProgressSink,
    cancel: &CancellationToken,
) -> Result<VerifyResult, AgentError> {
    let (scratch, _running) = Running::start(&ctx.cache_dir)?;
    // The sample: a window of the snapshot's files in its order, after the previous drill's last.
    let sample = if plan.req.sample_bytes > 0 {
        progress.phase(
            Phase::Running,
            format!("choosing a sample of snapshot {}", snapshot.short_id),
        );
        let listing = restic
            .clone()
            .with_sandbox(sandbox::for_dump(ctx, restic.repository()));
        let mut ls = listing.ls(&LsOptions {
            snapshot: snapshot.id.clone(),
        })?;
        let mut sampler = Sampler::new(plan.req.sample_bytes, &plan.req.sample_after);
        loop {
            let node = tokio::select! {
                n = ls.next_node() => n?,
                _ = cancel.cancelled() => return Err(AgentError::Cancelled),
            };
            let Some(node) = node else { break };
            if node.is_file() {
                sampler.offer(node.path, node.size);
            }
        }
        ls.finish().await?;
        Some(sampler.finish())
    } else {
        None
    };
    let sample = match sample {
        Some(s) if s.files.is_empty() && s.snapshot_files > 0 => {
            return Err(AgentError::InvalidArgument(format!(
                "no file of snapshot {} fits in the sample bound of {} ({} file(s), each larger or named in a way restic's include patterns cannot express); raise verify.sampleBytes",
                snapshot.short_id,
                human(plan.req.sample_bytes),
                s.snapshot_files
            )));
        }
        other => other,
    };
    // Everything fitted: the whole snapshot is restored, directories, links and all.
    let partial_sample = sample.as_ref().filter(|s| !s.complete);
    let needed = match partial_sample {
        Some(s) => s.bytes,
        None => snapshot
            .summary
            .as_ref()
            .map(|s| s.total_bytes_processed)
            .or(sample.as_ref().map(|s| s.bytes))
            .unwrap_or(0),
    };
    let _reservation = reserve(
        &ctx.cache_dir,
        ctx.verify_keep_free_percent,
        needed,
        &snapshot.short_id,
    )?;
    let mut include_files = Vec::new();
    // Bound by descriptor, as a restore's staging directory is.
    let data_fd = safe_fs::open_root(&scratch.data())?;
    let mut sb = sandbox::for_restore(ctx, &data_fd, restic.repository());
    if let Some(s) = partial_sample {
        std::fs::write(scratch.include_file(), s.include_patterns()).map_err(|source| {
            AgentError::Io {
                context: format!("writing {}", scratch.include_file().display()),
                source,
            }
        })?;
        sb = sb.read_only(scratch.include_file(), INCLUDE_FILE);
        include_files.push(PathBuf::from(INCLUDE_FILE));
    }
    progress.phase(
        Phase::Running,
        format!(
            "restoring {} of snapshot {} into scratch space with --verify",
            match partial_sample {
                Some(s) => format!("{} file(s), {}", s.files.len(), human(s.bytes)),
                None => "all".into(),
            },
            snapshot.short_id
        ),
    );
    let opts = RestoreOptions {
        snapshot: snapshot.id.clone(),
        target: sandbox::RESTORE_TARGET.into(),
        include_files,
        verify: true,
        sparse: true,
        ..Default::default()
    };
    let sandboxed = restic.clone().with_sandbox(sb);
    let restored = sandboxed
        .with_lock_retry(|| run_verify(&sandboxed, &opts, progress, cancel))
        .await;
    match restored {
        Ok(_) => {}
        Err(restic_wrap::Error::Cancelled { .. }) => return Err(AgentError::Cancelled),
        Err(e) => return Err(e.into()),
    }
    // What came back, counted on disk: a drill never reports files it did not see.
    let data = scratch.data();
    let stats = tokio::task::spawn_blocking(move || -> Result<MergeStats, AgentError> {
        let fd = safe_fs::open_root(&data)?;
        let mut stats = MergeStats::default();
        safe_fs::count_tree(&fd, &mut stats)?;
        Ok(stats)
    })
    .await
    .map_err(|e| AgentError::Io {
        context: "counting the restored files".into(),
        source: std::io::Error::other(e),
    })??;
    // What restic recorded when it took the snapshot (snapshots of restic before 0.17 record no
    // summary: then restic's own verification is the whole check).
    let (expected_files, expected_bytes) = match partial_sample {
        Some(s) => (Some(s.files.len() as u64), Some(s.bytes)),
        None => (
            None,
            snapshot.summary.as_ref().map(|s| s.total_bytes_processed),
        ),
    };
    if expected_bytes.is_some_and(|b| b != stats.bytes)
        || expected_files.is_some_and(|f| f != stats.files)
    {
        return Err(AgentError::InvalidArgument(format!(
            "snapshot {} came back incomplete: {} file(s) and {} restored where {}{} were expected",
            snapshot.short_id,
            stats.files,
            human(stats.bytes),
            expected_files.map_or(String::new(), |f| format!("{f} file(s) and ")),
            human(expected_bytes.unwrap_or_default())
        )));
    }
    let scratch_dir = scratch.dir.display().to_string();
    // Removing a large tree is blocking work.
    let _ = tokio::task::spawn_blocking(move || drop(scratch)).await;
    let sample = match &sample {
        Some(s) => VerifySample {
            complete: s.complete,
            first: s.files.first().cloned().unwrap_or_default(),
            last: s.files.last().cloned().unwrap_or_default(),
            wrapped: s.wrapped,
            skipped_files: s.skipped,
            snapshot_files: s.snapshot_files,
        },
        None => VerifySample {
            complete: true,
            snapshot_files: snapshot
                .summary
                .as_ref()
                .map_or(stats.files, |s| s.total_files_processed),
            ..Default::default()
        },
    };
    tracing::info!(snapshot = %snapshot.id, files = stats.files, bytes = stats.bytes, complete = sample.complete, "snapshot verified");
    Ok(VerifyResult {
        snapshot_id: snapshot.id.clone(),
        snapshot_time: snapshot.time.clone(),
        files: stats.files,
        bytes: stats.bytes,
        scratch_dir,
        sample: Some(sample),
        ..Default::default()
    })
}

async fn run_verify(
    restic: &restic_wrap::Restic,
    opts: &RestoreOptions,
    progress: &ProgressSink,
    cancel: &CancellationToken,
) -> restic_wrap::Result<restic_wrap::stream::RestoreOutput> {
    let mut run = restic.restore(opts)?;
    follow::follow(&mut run, cancel, "restore --verify", |s| {
        progress.send(follow::restore_progress(&s));
    })
    .await?;
    follow::finish(run.finish(), cancel, "restore --verify").await
}

fn human(bytes: u64) -> String {
    crate::restore::human(bytes)
}

impl Sample {
    /// The include file: one literal path per line, restic's glob characters escaped.
    fn include_patterns(&self) -> String {
        let mut out = String::new();
        for f in &self.files {
            out.push_str(&crate::restore::escape_glob(f));
            out.push('\n');
        }
        out
    }
}
