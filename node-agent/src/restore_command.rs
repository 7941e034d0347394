//! Restoring a backup command's snapshot: `restic dump` of its one file, streamed into a restore
//! command exec'd in a pod on this node (`psql -U app shop`), never buffered whole.
//!
//! The rules mirror backup commands: the command sees EOF only after restic has dumped the whole
//! file and exited 0; a failed dump, a timeout or a cancelled request kills the command (with
//! everything it started) before EOF; only exit 0 is a success.

use std::time::{Duration, Instant};

use restic_wrap::options::{DumpOptions, GlobalOptions};
use stowage_proto::v1::{Phase, Progress, RestoreCommandRequest, RestoreResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::command::{DEFAULT_TIMEOUT, failed};
use crate::context::{AgentContext, ProgressSink};
use crate::error::AgentError;
use crate::exec::{self, ExecTarget, Exit};
use crate::identity::CommandIdentity;
use crate::memory::Operation;
use crate::restore::{Whose, resolve_snapshot};
use crate::{repository, sandbox};

/// What a failed restore command means.
const INCOMPLETE: &str =
    "the restore did not complete (the command may have applied part of the dump)";
/// Bytes read from restic per write into the command.
const CHUNK: usize = 64 * 1024;

/// A validated request.
pub struct RestoreCommandPlan {
    run_id: String,
    identity: CommandIdentity,
    repo: restic_wrap::Repository,
    spec: stowage_proto::v1::Repository,
    snapshot: String,
    target: ExecTarget,
    timeout: Duration,
}

pub fn plan(
    ctx: &AgentContext,
    req: RestoreCommandRequest,
) -> Result<RestoreCommandPlan, AgentError> {
    let repo = repository::from_proto(req.repository.as_ref(), &ctx.local_roots)?;
    let source = req
        .source
        .ok_or_else(|| AgentError::InvalidArgument("source is required".into()))?;
    if req.command.trim().is_empty() {
        return Err(AgentError::InvalidArgument("command is empty".into()));
    }
    // Never inferred from the source: in a cross-namespace restore the source namespace has its own
    // pods, and one of the same name there must not receive (or run) this restore.
    if req.target_namespace.is_empty() {
        return Err(AgentError::InvalidArgument(
            "target_namespace is required (the namespace of the pod to stream into)".into(),
        ));
    }
    let identity = CommandIdentity::new(
        &source.namespace,
        &source.owner_kind,
        &source.owner_name,
        &source.container,
        &req.pod,
    )?;
    let timeout = ctx.command_timeout(req.timeout_seconds, DEFAULT_TIMEOUT);
    Ok(RestoreCommandPlan {
        run_id: req.run_id,
        identity,
        repo,
        spec: req.repository.unwrap_or_default(),
        snapshot: req.snapshot,
        target: ExecTarget {
            namespace: req.target_namespace,
            pod: req.pod,
            container: req.container,
            command: req.command,
        },
        timeout,
    })
}

pub async fn execute(
    ctx: &AgentContext,
    plan: RestoreCommandPlan,
    progress: ProgressSink,
    cancel: CancellationToken,
) -> Result<RestoreResult, AgentError> {
    let RestoreCommandPlan {
        run_id,
        identity,
        repo,
        spec,
        snapshot,
        mut target,
        timeout,
    } = plan;
    let client = ctx.kube.clone().ok_or(AgentError::NoKubernetes)?;
    let pod = exec::pod_on_node(&client, &target, &ctx.node_name).await?;
    target.container = exec::container_of(&pod, &target.container)?;
    let _slot = ctx
        .slot(
            Operation::Restore,
            &target.namespace,
            &repo,
            &progress,
            &cancel,
        )
        .await?;
    let started = Instant::now();
    let restic = ctx.restic(repo, Some(&spec), Some(progress.clone()));
    let whose = Whose::command(&identity);
    let snap = tokio::select! {
        s = resolve_snapshot(ctx, &restic, &whose, &snapshot) => s?,
        _ = cancel.cancelled() => return Err(AgentError::Cancelled),
    };
    // A command's snapshot holds exactly one file, the stream.
    let [path] = snap.paths.as_slice() else {
        return Err(AgentError::InvalidArgument(format!(
            "snapshot {} holds {} paths; a backup command's snapshot holds one file",
            snap.short_id,
            snap.paths.len()
        )));
    };
    let restic = restic
        .clone()
        .with_global(GlobalOptions {
            retry_lock: Some(ctx.lock_policy.max_wait),
            ..sandbox::read_only_globals(&restic)
        })
        .with_sandbox(sandbox::for_dump(ctx, restic.repository()));
    let mut dump = restic.dump(&DumpOptions {
        snapshot: snap.id.clone(),
        path: path.clone(),
    })?;
    let mut output = dump
        .stdout()
        .ok_or_else(|| AgentError::InvalidArgument("restic dump has no stdout".into()))?;
    progress.phase(
        Phase::Running,
        format!(
            "streaming snapshot {} into {}",
            snap.short_id,
            target.describe()
        ),
    );
    tracing::info!(run = %run_id, snapshot = %snap.id, file = %path, command = %target.describe(), "command restore started");
    let mut command = exec::start(&client, &target, true).await?;
    let mut stdin = command
        .stdin
        .take()
        .ok_or_else(|| AgentError::Kubernetes("the exec stream has no stdin".into()))?;
    // The command's stdout is not data here: drain it so the stream never stalls.
    let mut stdout = std::mem::replace(&mut command.stdout, Box::new(tokio::io::empty()));
    let drain = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await;
    });

    let deadline = tokio::time::Instant::now() + timeout;
    let metrics = ctx.metrics.clone();
    let feed = async {
        let mut buf = vec![0u8; CHUNK];
        let mut bytes = 0u64;
        let mut reported = Instant::now();
        loop {
            let n = output.read(&mut buf).await.map_err(|e| AgentError::Io {
                context: "reading restic dump's output".into(),
                source: e,
            })?;
            if n == 0 {
                return Ok(bytes);
            }
            stdin.write_all(&buf[..n]).await.map_err(|e| {
                AgentError::Kubernetes(format!("writing into the command's stdin: {e}"))
            })?;
            bytes += n as u64;
            metrics.restore_bytes.inc_by(n as u64);
            if reported.elapsed() >= Duration::from_millis(500) {
                reported = Instant::now();
                progress.send(Progress {
                    phase: Phase::Running.into(),
                    bytes_done: bytes,
                    seconds_elapsed: started.elapsed().as_secs(),
                    ..Default::default()
                });
            }
        }
    };
    let streamed = tokio::select! {
        r = tokio::time::timeout_at(deadline, feed) => match r {
            Ok(r) => r,
            Err(_) => Err(AgentError::CommandTimedOut { command: target.describe(), after: timeout, outcome: INCOMPLETE }),
        },
        _ = cancel.cancelled() => Err(AgentError::Cancelled),
    };
    // EOF only after restic says the dump is whole.
    let streamed = match streamed {
        Ok(bytes) => dump
            .finish()
            .await
            .map(|()| bytes)
            .map_err(AgentError::from),
        Err(e) => {
            dump.stop().await;
            Err(e)
        }
    };
    let bytes = match streamed {
        Ok(bytes) => bytes,
        Err(e) => {
            let stderr = command.kill().await;
            drain.abort();
            tracing::warn!(run = %run_id, command = %target.describe(), error = %e, stderr = %stderr, "command restore failed");
            return Err(e);
        }
    };
    // EOF for the command. kube's stdin is one half of a split pipe: dropping it is not enough,
    // only a shutdown closes the pipe (and sends the close frame).
    if let Err(e) = stdin.shutdown().await {
        let stderr = command.kill().await;
        drain.abort();
        return Err(AgentError::Kubernetes(format!(
            "closing the command's stdin: {e}; the command was stopped. Its stderr: {stderr}"
        )));
    }
    drop(stdin);
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let finished = command.wait(left.max(Duration::from_secs(1))).await;
    drain.abort();
    let exit = match finished {
        Ok(f) if f.exit == Exit::Success => Exit::Success,
        Ok(f) => return Err(failed(&target, &f.exit, &f.stderr, INCOMPLETE)),
        Err((still, after)) => {
            let stderr = still.kill().await;
            tracing::warn!(command = %target.describe(), stderr = %stderr, "no exit status");
            return Err(AgentError::CommandTimedOut {
                command: target.describe(),
                after,
                outcome: INCOMPLETE,
            });
        }
    };
    let duration = started.elapsed().as_secs_f64();
    ctx.metrics.restore_duration.observe(duration);
    tracing::info!(run = %run_id, snapshot = %snap.id, bytes, duration_secs = duration, "command restore finished");
    Ok(RestoreResult {
        snapshot_id: snap.id,
        files_restored: 1,
        bytes_restored: bytes,
        duration_seconds: duration,
        target_dir: String::new(),
        stream_bytes: bytes,
        exit_code: exit.code(),
        ..Default::default()
    })
}
