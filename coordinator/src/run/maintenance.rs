//! Check and Prune runs: repository-wide, under restic's exclusive lock, executed by one ready agent
//! (the first that answers; an unreachable agent makes the coordinator try the next).

use std::sync::Arc;

use kube::ResourceExt;
use stowage_proto::v1::{self as pb, CheckRequest, MaintenanceResult, PruneRequest};

use super::{Begun, begin, run_id};
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::crd::{Check, ItemStatus, Prune, Retention, RunPhase};
use crate::dispatch::{self, DispatchError, Maintenance};
use crate::restic_fields;
use crate::runs::RunObject;

pub const NO_AGENT: &str = "NoReadyAgent";
pub const NO_RETENTION: &str = "NoRetention";

fn retention_proto(r: &Retention) -> pb::RetentionPolicy {
    pb::RetentionPolicy {
        keep_last: r.keep_last.unwrap_or(0),
        keep_hourly: r.keep_hourly.unwrap_or(0),
        keep_daily: r.keep_daily.unwrap_or(0),
        keep_weekly: r.keep_weekly.unwrap_or(0),
        keep_monthly: r.keep_monthly.unwrap_or(0),
        keep_yearly: r.keep_yearly.unwrap_or(0),
        keep_within: r.keep_within_duration.clone().unwrap_or_default(),
        keep_tags: r.keep_tags.clone(),
    }
}

/// Tries the ready agents in turn until one takes the task.
async fn on_some_agent(
    ctx: &Ctx,
    task: &Maintenance,
) -> Result<(String, MaintenanceResult), DispatchError> {
    let nodes = ctx.agents.ready_nodes();
    let mut last = None;
    for node in nodes {
        match dispatch::maintain(&ctx.agents, &node, task, |_| {}).await {
            Ok(r) => return Ok((node, r)),
            Err(e) if e.try_elsewhere() => {
                tracing::warn!(node = %node, error = %e, "agent unavailable for maintenance; trying the next");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(DispatchError::NoResult {
        node: "(none)".into(),
    }))
}

async fn run_task<K: RunObject>(ctx: Arc<Ctx>, run: Arc<K>, begun: Begun, task: Maintenance) {
    if ctx.agents.ready_nodes().is_empty() {
        let f = Finding::new(
            NO_AGENT,
            format!(
                "no ready Stowage agent (pods in namespace {} with labels {})",
                ctx.config.agent_namespace, ctx.config.agent_selector
            ),
        );
        return begun
            .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
            .await;
    }
    match on_some_agent(&ctx, &task).await {
        Ok((node, r)) => {
            let verdict = r.report.lines().last().unwrap_or_default().to_string();
            let finding = match &task {
                Maintenance::Check(_) => Finding::new(
                    "CheckPassed",
                    format!(
                        "restic check on {node} in {:.1}s: {verdict}",
                        r.duration_seconds
                    ),
                ),
                Maintenance::Prune(_) => {
                    let (kept, removed) = r
                        .identities
                        .iter()
                        .fold((0, 0), |(k, d), i| (k + i.kept, d + i.removed));
                    Finding::new(
                        "Pruned",
                        format!(
                            "on {node}: {} volume(s), {kept} snapshot(s) kept, {removed} removed; {verdict}",
                            r.identities.len()
                        ),
                    )
                }
            };
            let items: Vec<ItemStatus> = r
                .identities
                .iter()
                .map(|i| ItemStatus {
                    namespace: i.namespace.clone(),
                    pvc: i.pvc.clone(),
                    node: Some(node.clone()),
                    phase: RunPhase::Succeeded,
                    kept: Some(i.kept),
                    removed: Some(i.removed),
                    ..Default::default()
                })
                .collect();
            begun.status.run(move |s| s.items = items);
            begun
                .finish(ctx.as_ref(), run.as_ref(), RunPhase::Succeeded, &finding)
                .await;
        }
        Err(e) => {
            let reason = match &task {
                Maintenance::Check(_) => "CheckFailed",
                Maintenance::Prune(_) => "PruneFailed",
            };
            let f = Finding::new(reason, e.to_string());
            begun
                .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
                .await;
        }
    }
}

pub async fn execute_check(ctx: Arc<Ctx>, run: Arc<Check>) -> Result<(), kube::Error> {
    let Some(begun) = begin(ctx.as_ref(), run.as_ref()).await? else {
        return Ok(());
    };
    let subset = begun.spec.read_data_subset.clone();
    let at = begun.origin.field("readDataSubset");
    if let Some(f) = subset
        .as_deref()
        .and_then(|v| restic_fields::read_data_subset(v, &at))
    {
        begun
            .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
            .await;
        return Ok(());
    }
    let task = Maintenance::Check(CheckRequest {
        run_id: run_id(run.as_ref()),
        repository: Some(begun.repository.clone()),
        read_data_subset: subset.unwrap_or_default(),
    });
    run_task(ctx, run, begun, task).await;
    Ok(())
}

pub async fn execute_prune(ctx: Arc<Ctx>, run: Arc<Prune>) -> Result<(), kube::Error> {
    let namespace = run.namespace().unwrap_or_default();
    let Some(begun) = begin(ctx.as_ref(), run.as_ref()).await? else {
        return Ok(());
    };
    let at = begun.origin.field("retention");
    let Some(retention) = begun
        .spec
        .retention
        .clone()
        .filter(|r| *r != Retention::default())
    else {
        let f = Finding::new(
            NO_RETENTION,
            format!(
                "{at}: set at least one keep rule (or spec.scheduleRef to a Schedule with prune.retention)"
            ),
        );
        begun
            .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
            .await;
        return Ok(());
    };
    if let Some(f) = Finding::joined(&restic_fields::retention(&retention, &at)) {
        begun
            .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
            .await;
        return Ok(());
    }
    let task = Maintenance::Prune(PruneRequest {
        run_id: run_id(run.as_ref()),
        repository: Some(begun.repository.clone()),
        retention: Some(retention_proto(&retention)),
        namespace,
        dry_run: false,
    });
    run_task(ctx, run, begun, task).await;
    Ok(())
}
