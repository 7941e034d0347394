//! Check and Prune runs: repository-wide, under restic's exclusive lock, executed by one ready agent
//! (the first that answers; an unreachable agent makes the coordinator try the next). A Prune of a
//! backend with `maintenance` credentials runs on the maintenance container only: those
//! credentials, which may delete, never reach a node agent (docs/hardening.md).

use std::sync::Arc;

use kube::ResourceExt;
use stowage_proto::v1::{self as pb, CheckRequest, MaintenanceResult, PruneRequest};

use super::status::StatusHandle;
use super::{Begun, begin, run_id};
use crate::agents::AgentEndpoint;
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::dispatch::{self, DispatchError, Maintenance};
use crate::restic_fields;
use crate::runs::{RunObject, now_rfc3339};
use stowage_api::{Check, ItemStatus, Prune, RepositoryFigures, Retention, RunPhase};
use stowage_common::backend::{self, Secrets};

pub const NO_AGENT: &str = "NoReadyAgent";
pub const NO_MAINTENANCE_CONTAINER: &str = "NoMaintenanceContainer";
/// Snapshot ids listed per identity and kind in a Prune's status (the counts are exact).
const LISTED_IDS: usize = 50;

/// "1.5 MiB" for messages.
pub(crate) fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < units.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[unit])
    }
}
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

/// Tries the ready agents in turn until one takes the task. While it waits for a repository lock,
/// the run's status says whose.
async fn on_some_agent<K: RunObject>(
    ctx: &Arc<Ctx>,
    run: &Arc<K>,
    status: &StatusHandle,
    task: &Maintenance,
) -> Result<(String, MaintenanceResult), DispatchError> {
    let nodes = ctx.agents.ready_nodes();
    let mut last = None;
    let mut waiting = false;
    for node in nodes {
        let progress = |p: &pb::Progress| {
            let message = super::lock_news(ctx, run, p);
            if message.is_some() || waiting {
                waiting = message.is_some();
                status.run(move |s| s.message = message);
            }
        };
        match dispatch::maintain(&ctx.agents, &node, task, progress).await {
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

/// Runs `task` on the maintenance container, and nowhere else.
async fn on_maintenance_container<K: RunObject>(
    ctx: &Arc<Ctx>,
    run: &Arc<K>,
    status: &StatusHandle,
    ep: AgentEndpoint,
    task: &Maintenance,
) -> Result<(String, MaintenanceResult), DispatchError> {
    let node = ep.node.clone();
    let mut waiting = false;
    let progress = |p: &pb::Progress| {
        let message = super::lock_news(ctx, run, p);
        if message.is_some() || waiting {
            waiting = message.is_some();
            status.run(move |s| s.message = message);
        }
    };
    let r = dispatch::maintain_at(&ctx.agents, ep, task, progress).await?;
    Ok((node, r))
}

async fn run_task<K: RunObject>(
    ctx: Arc<Ctx>,
    run: Arc<K>,
    begun: Begun,
    task: Maintenance,
    maintenance: Option<AgentEndpoint>,
) {
    if maintenance.is_none() && ctx.agents.ready_nodes().is_empty() {
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
    let done = match maintenance {
        Some(ep) => on_maintenance_container(&ctx, &run, &begun.status, ep, &task).await,
        None => on_some_agent(&ctx, &run, &begun.status, &task).await,
    };
    match done {
        Ok((node, r)) => {
            let verdict = r.report.lines().last().unwrap_or_default().to_string();
            let dry_run = matches!(&task, Maintenance::Prune(p) if p.dry_run);
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
                    if dry_run {
                        Finding::new(
                            "DryRun",
                            format!(
                                "dry run on {node}, nothing deleted: {} volume(s), {kept} snapshot(s) would be kept, {removed} removed",
                                r.identities.len()
                            ),
                        )
                    } else {
                        Finding::new(
                            "Pruned",
                            format!(
                                "on {node}: {} volume(s), {kept} snapshot(s) kept, {removed} removed, {} freed; {verdict}",
                                r.identities.len(),
                                human_bytes(r.freed_bytes)
                            ),
                        )
                    }
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
                    kept_snapshots: i.kept_ids.iter().take(LISTED_IDS).cloned().collect(),
                    removed_snapshots: i.removed_ids.iter().take(LISTED_IDS).cloned().collect(),
                    ..Default::default()
                })
                .collect();
            let freed = matches!(&task, Maintenance::Prune(_)).then_some(r.freed_bytes);
            let figures = r.figures.map(|f| RepositoryFigures {
                snapshots: f.snapshots,
                size_bytes: f.size_bytes,
                key_created: (!f.key_created.is_empty()).then_some(f.key_created),
                time: Some(now_rfc3339()),
            });
            begun.status.run(move |s| {
                s.items = items;
                s.message = None;
                s.freed_bytes = freed;
                s.repository = figures;
            });
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
    run_task(ctx, run, begun, task, None).await;
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
    // Append-only backends: the credentials that may delete, and where they may go.
    let at = begun.origin.field("backend");
    let maintenance = match backend::maintenance_spec(&begun.spec.backend, &at) {
        Ok(m) => m,
        Err(f) => {
            begun
                .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
                .await;
            return Ok(());
        }
    };
    let (repository, on) = match maintenance {
        None => (begun.repository.clone(), None),
        Some(spec) => {
            let Some(ep) = ctx.agents.maintenance_endpoint() else {
                let f = Finding::new(
                    NO_MAINTENANCE_CONTAINER,
                    format!(
                        "{at}.maintenance: these credentials may delete and never go to a node agent, and this coordinator has no maintenance container to run the Prune (--maintenance-agent; chart value coordinator.maintenance.enabled)"
                    ),
                );
                begun
                    .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
                    .await;
                return Ok(());
            };
            match backend::resolve(
                &Secrets::Api(ctx.client.clone()),
                &ctx.config.allowed_endpoint,
                &namespace,
                &spec,
                &format!("{at}.maintenance"),
            )
            .await
            {
                Ok(r) => (r, Some(ep)),
                Err(f) => {
                    begun
                        .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
                        .await;
                    return Ok(());
                }
            }
        }
    };
    let task = Maintenance::Prune(PruneRequest {
        run_id: run_id(run.as_ref()),
        repository: Some(repository),
        retention: Some(retention_proto(&retention)),
        namespace,
        dry_run: run.spec.dry_run,
    });
    run_task(ctx, run, begun, task, on).await;
    Ok(())
}
