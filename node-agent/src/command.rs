//! Backing up a command's stdout (a database dump): exec it in a pod on this node and stream its
//! stdout into `restic backup --stdin` in a sandbox, never buffering it whole.
//!
//! A failed command never yields a snapshot. The end of the stream is held back until the command's
//! exit status is known: only exit 0 closes restic's stdin (and so lets restic write a snapshot).
//! A non-zero exit, a timeout, a broken stream or a cancelled request kills restic before EOF, so it
//! writes none; the command is then killed with everything it started.

use std::time::{Duration, Instant};

use restic_wrap::options::BackupOptions;
use restic_wrap::stream::BackupOutput;
use stowage_proto::v1::{
    BackupRequest, BackupResult, Outcome, Phase, Progress, backup_request::Source,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::context::{AgentContext, ProgressSink};
use crate::error::AgentError;
use crate::exec::{self, ExecTarget, Exit};
use crate::identity::{CommandIdentity, TAG_RUN};
use crate::memory::Operation;
use crate::{follow, repository, sandbox};

/// A command's default time limit.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Bytes read from the command per write into restic.
const CHUNK: usize = 64 * 1024;

/// A validated command backup.
pub struct CommandPlan {
    run_id: String,
    extra_tags: Vec<String>,
    identity: CommandIdentity,
    repo: restic_wrap::Repository,
    spec: stowage_proto::v1::Repository,
    target: ExecTarget,
    file_name: String,
    timeout: Duration,
}

/// A file name inside the snapshot: one path component, printable.
fn valid_file_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && !s.contains('/')
        && !s.chars().any(char::is_control)
}

pub fn plan(ctx: &AgentContext, req: BackupRequest) -> Result<CommandPlan, AgentError> {
    let Some(Source::Command(cmd)) = req.source.clone() else {
        return Err(AgentError::InvalidArgument(
            "source.command is required".into(),
        ));
    };
    let repo = repository::from_proto(req.repository.as_ref(), &ctx.local_roots)?;
    crate::backup::validate_tags(&req)?;
    let namespace = req
        .identity
        .as_ref()
        .map(|i| i.namespace.clone())
        .unwrap_or_default();
    if cmd.command.trim().is_empty() {
        return Err(AgentError::InvalidArgument(
            "source.command.command is empty".into(),
        ));
    }
    if !valid_file_name(&cmd.file_name) {
        return Err(AgentError::InvalidArgument(format!(
            "source.command.file_name {:?} must be one path component",
            cmd.file_name
        )));
    }
    // The container is checked against the pod when the command starts; the identity needs a name.
    let container = if cmd.container.is_empty() {
        "default".to_string()
    } else {
        cmd.container.clone()
    };
    let identity = CommandIdentity::new(
        &namespace,
        &cmd.owner_kind,
        &cmd.owner_name,
        &container,
        &cmd.pod,
    )?;
    let timeout = ctx.command_timeout(cmd.timeout_seconds, DEFAULT_TIMEOUT);
    Ok(CommandPlan {
        run_id: req.run_id,
        extra_tags: req.extra_tags,
        identity,
        repo,
        spec: req.repository.unwrap_or_default(),
        target: ExecTarget {
            namespace,
            pod: cmd.pod,
            container: cmd.container,
            command: cmd.command,
        },
        file_name: cmd.file_name,
        timeout,
    })
}

/// Why the stream ended, before restic is told.
enum StreamEnd {
    /// The command exited 0 after `bytes`.
    Done(u64),
    Failed(AgentError),
}

pub async fn execute(
    ctx: &AgentContext,
    plan: CommandPlan,
    progress: ProgressSink,
    cancel: CancellationToken,
) -> Result<BackupResult, AgentError> {
    let CommandPlan {
        run_id,
        extra_tags,
        mut identity,
        repo,
        spec,
        mut target,
        file_name,
        timeout,
    } = plan;
    let client = ctx.kube.clone().ok_or(AgentError::NoKubernetes)?;
    let pod = exec::pod_on_node(&client, &target, &ctx.node_name).await?;
    target.container = exec::container_of(&pod, &target.container)?;
    identity.container = target.container.clone();
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

    let restic = ctx.restic(repo, Some(&spec), Some(progress.clone()));
    restic.ensure_repository(spec.auto_init).await?;
    let mut tags = identity.backup_tags();
    if !run_id.is_empty() {
        tags.push(format!("{TAG_RUN}={run_id}"));
    }
    tags.extend(extra_tags);
    let opts = BackupOptions {
        host: Some(identity.host()),
        tags,
        stdin_filename: Some(file_name.clone()),
        ..Default::default()
    };
    let tmp = sandbox::OperationTmp::create(&ctx.cache_dir)?;
    let sandbox = sandbox::for_stream(ctx, restic.repository(), &tmp)?;
    // A stream cannot be replayed, so the lock policy's retry (a new restic) does not apply:
    // restic waits for a held lock itself, the command blocking on its stdout meanwhile.
    let mut global = restic.global().clone();
    global.retry_lock = Some(ctx.lock_policy.max_wait);
    let restic = restic.with_sandbox(sandbox).with_global(global);
    tracing::info!(run = %run_id, command = %target.describe(), host = %identity.host(), "command backup started");

    // restic first, so the command's output has somewhere to go from its first byte.
    let mut run = restic.backup(&opts, std::path::Path::new("/"))?;
    let mut stdin = run.take_stdin().ok_or_else(|| {
        AgentError::InvalidArgument("restic was started without a stdin pipe".into())
    })?;
    progress.phase(Phase::Running, format!("streaming {}", target.describe()));
    let mut command = exec::start(&client, &target, false).await?;

    // restic is stopped (without EOF) when this fires.
    let abort = cancel.child_token();
    let metrics = ctx.metrics.clone();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut stdout = std::mem::replace(&mut command.stdout, Box::new(tokio::io::empty()));
    let feed = async {
        let mut buf = vec![0u8; CHUNK];
        let mut bytes = 0u64;
        loop {
            let n = match stdout.read(&mut buf).await {
                Ok(0) => return Ok(bytes),
                Ok(n) => n,
                Err(e) => {
                    return Err(AgentError::Kubernetes(format!(
                        "reading the command's output: {e}"
                    )));
                }
            };
            if let Err(e) = stdin.write_all(&buf[..n]).await {
                return Err(AgentError::Io {
                    context: "writing the command's output into restic".into(),
                    source: e,
                });
            }
            bytes += n as u64;
            metrics.stream_bytes.inc_by(n as u64);
        }
    };
    let on_status = |s: restic_wrap::json::BackupStatus| {
        progress.send(Progress {
            phase: Phase::Running.into(),
            bytes_done: s.bytes_done,
            seconds_elapsed: s.seconds_elapsed,
            ..Default::default()
        });
    };
    // Set when following restic ended before the command's output did: that future is then complete
    // and must not be awaited again. `restic_exited`: its output closed, so restic exited on its own
    // and its exit status and stderr say why.
    let mut restic_ended = false;
    let mut restic_exited = false;
    let outcome = {
        let restic_follow = follow::follow(&mut run, &abort, "backup", on_status);
        tokio::pin!(restic_follow);
        // Phase 1: the command's stdout to its end (or the timeout, a cancel, or restic dying).
        let streamed = tokio::select! {
            r = tokio::time::timeout_at(deadline, feed) => match r {
                Ok(Ok(bytes)) => Ok(bytes),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(AgentError::CommandTimedOut { command: target.describe(), after: timeout, outcome: NO_SNAPSHOT }),
            },
            r = &mut restic_follow => {
                restic_ended = true;
                restic_exited = r.is_ok();
                Err(match r {
                    Err(restic_wrap::Error::Cancelled { .. }) => AgentError::Cancelled,
                    Err(e) => e.into(),
                    Ok(()) => AgentError::Kubernetes("restic ended before the command's output did".into()),
                })
            }
        };
        // Phase 2: the exit status decides whether restic sees EOF.
        let end = match streamed {
            Ok(bytes) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match command.wait(left.max(Duration::from_secs(1))).await {
                    Ok(f) if f.exit == Exit::Success => StreamEnd::Done(bytes),
                    Ok(f) => StreamEnd::Failed(failed(&target, &f.exit, &f.stderr, NO_SNAPSHOT)),
                    Err((still, after)) => {
                        let stderr = still.kill().await;
                        tracing::warn!(command = %target.describe(), stderr = %stderr, "no exit status");
                        StreamEnd::Failed(AgentError::CommandTimedOut {
                            command: target.describe(),
                            after,
                            outcome: NO_SNAPSHOT,
                        })
                    }
                }
            }
            Err(e) => {
                let stderr = command.kill().await;
                StreamEnd::Failed(match e {
                    AgentError::CommandTimedOut { .. } | AgentError::Cancelled => e,
                    other if !stderr.is_empty() => {
                        AgentError::Kubernetes(format!("{other}; the command's stderr: {stderr}"))
                    }
                    other => other,
                })
            }
        };
        match end {
            StreamEnd::Done(bytes) => {
                drop(stdin);
                match restic_follow.await {
                    Ok(()) => Ok(bytes),
                    Err(restic_wrap::Error::Cancelled { .. }) => Err(AgentError::Cancelled),
                    Err(e) => Err(e.into()),
                }
            }
            StreamEnd::Failed(e) => {
                // No EOF: restic is stopped mid-stream and writes no snapshot.
                if !restic_ended {
                    abort.cancel();
                    let _ = restic_follow.await;
                }
                // stdin stays open until restic is stopped below: EOF now would let a live restic
                // save what it has read as a snapshot.
                Err(e)
            }
        }
    };
    let bytes = match outcome {
        Ok(b) => b,
        Err(e) => {
            let e = if restic_exited {
                // restic exited on its own mid-stream: its exit status and stderr are the reason.
                // Bounded: its output closed, so it is exiting (dropping the run kills it if not).
                match tokio::time::timeout(Duration::from_secs(30), run.finish()).await {
                    Ok(Err(restic_error)) => restic_error.into(),
                    _ => e,
                }
            } else {
                run.stop().await;
                e
            };
            // (stdin, if still open, closes on return: after restic was stopped.)
            tracing::warn!(run = %run_id, command = %target.describe(), error = %e, "command backup failed; no snapshot");
            return Err(e);
        }
    };
    let BackupOutput { summary } = run.finish().await?;
    let duration = started.elapsed().as_secs_f64();
    ctx.metrics.backup_duration.observe(duration);
    ctx.metrics.backup_bytes_added.inc_by(summary.data_added);
    tracing::info!(
        run = %run_id, command = %target.describe(), snapshot = %summary.snapshot_id, bytes,
        bytes_added = summary.data_added, duration_secs = duration, "command backup finished"
    );
    Ok(BackupResult {
        outcome: Outcome::Succeeded.into(),
        snapshot_id: summary.snapshot_id,
        files_new: summary.files_new,
        files_changed: summary.files_changed,
        files_unmodified: summary.files_unmodified,
        data_added_bytes: summary.data_added,
        total_files_processed: summary.total_files_processed,
        total_bytes_processed: summary.total_bytes_processed,
        duration_seconds: duration,
        exit_code: 0,
        stream_bytes: bytes,
        ..Default::default()
    })
}

/// What a failed backup command means.
const NO_SNAPSHOT: &str = "no snapshot was made";

/// The error of a command that did not exit 0; `outcome` says what that means.
pub fn failed(target: &ExecTarget, exit: &Exit, stderr: &str, outcome: &'static str) -> AgentError {
    AgentError::CommandFailed {
        outcome,
        command: target.describe(),
        exit_code: exit.code(),
        how: match exit {
            Exit::Code(c) => format!("exited with status {c}"),
            Exit::Failed(m) => format!("failed: {m}"),
            Exit::Broken | Exit::Success => {
                "ended without an exit status (the exec stream broke)".into()
            }
        },
        stderr: stderr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_one_component() {
        assert!(valid_file_name("shop-pg-0-db.sql"));
        for bad in ["", ".", "..", "a/b", "x\n", &"a".repeat(256)] {
            assert!(!valid_file_name(bad), "{bad:?}");
        }
    }
}
