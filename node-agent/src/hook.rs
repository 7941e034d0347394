//! Pre- and post-backup hooks: a command run in a pod on this node (e.g. `fsfreeze`, a table
//! flush), bounded by its timeout. How it ended is a result; what it means (skip the pod's volumes,
//! or go on) is the coordinator's decision.

use std::time::{Duration, Instant};

use stowage_proto::v1::{HookRequest, HookResult};

use crate::context::AgentContext;
use crate::error::AgentError;
use crate::exec::{self, ExecTarget};
use crate::identity::is_k8s_name;

/// A hook's default time limit.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(ctx: &AgentContext, req: HookRequest) -> Result<HookResult, AgentError> {
    let kind = match req.kind.as_str() {
        "pre" | "post" => req.kind.clone(),
        other => {
            return Err(AgentError::InvalidArgument(format!(
                "kind {other:?}: use \"pre\" or \"post\""
            )));
        }
    };
    for (field, v) in [("namespace", &req.namespace), ("pod", &req.pod)] {
        if !is_k8s_name(v) {
            return Err(AgentError::InvalidArgument(format!(
                "{field} {v:?} is not a valid name"
            )));
        }
    }
    if req.command.trim().is_empty() {
        return Err(AgentError::InvalidArgument("command is empty".into()));
    }
    let client = ctx.kube.clone().ok_or(AgentError::NoKubernetes)?;
    let mut target = ExecTarget {
        namespace: req.namespace,
        pod: req.pod,
        container: req.container,
        command: req.command,
    };
    let pod = exec::pod_on_node(&client, &target, &ctx.node_name).await?;
    target.container = exec::container_of(&pod, &target.container)?;
    let timeout = ctx.command_timeout(req.timeout_seconds, DEFAULT_TIMEOUT);
    let started = Instant::now();
    let mut command = exec::start(&client, &target, false).await?;
    // Hooks' output is not data: drain it so the stream never stalls.
    let mut stdout = std::mem::replace(&mut command.stdout, Box::new(tokio::io::empty()));
    let mut sink = tokio::io::sink();
    let drain = tokio::io::copy(&mut stdout, &mut sink);
    let (exit, stderr, timed_out) = match tokio::time::timeout(timeout, drain).await {
        Ok(_) => {
            let left = timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_secs(1));
            match command.wait(left).await {
                Ok(f) => (f.exit, f.stderr, false),
                Err((still, _)) => (exec::Exit::Broken, still.kill().await, true),
            }
        }
        Err(_) => (exec::Exit::Broken, command.kill().await, true),
    };
    let duration = started.elapsed().as_secs_f64();
    let result = if timed_out {
        "timed_out"
    } else if exit == exec::Exit::Success {
        "succeeded"
    } else {
        "failed"
    };
    ctx.metrics
        .hook_runs
        .with_label_values(&[&kind, result])
        .inc();
    ctx.metrics
        .hook_duration
        .with_label_values(&[&kind])
        .observe(duration);
    tracing::info!(run = %req.run_id, kind, command = %target.describe(), exit = exit.code(), timed_out, duration_secs = duration, "hook finished");
    Ok(HookResult {
        exit_code: exit.code(),
        duration_seconds: duration,
        timed_out,
        stderr: if let exec::Exit::Failed(m) = &exit {
            format!("{m} {stderr}").trim().to_string()
        } else {
            stderr
        },
    })
}
