//! Executing runs. A run executes in a task owned by the leader, from what the run object says (its
//! spec, or what it resolved into its status when it started), never from its Schedule's current
//! state. Its status is written by one task ([`status`]); a run found finished by a fresh read is
//! never executed again, whatever a cache says.

pub mod backup;
pub mod command;
pub mod hooks;
pub mod maintenance;
pub mod restore;
pub mod rotation;
pub mod status;
pub mod verify;
pub mod volume;

use std::sync::Arc;

use kube::{Api, ResourceExt};
use stowage_proto::v1 as pb;

use crate::conditions::{self, Finding};
use crate::context::Ctx;
use crate::errors;
use crate::runs::{RunObject, is_terminal, now_rfc3339, phase_label};
use status::{StatusHandle, StatusWriter, apply_status};
use stowage_api::{ResolvedSpec, RunPhase, RunStatus, Schedule};
use stowage_common::backend::{self, Secrets};

pub const SCHEDULE_NOT_FOUND: &str = "ScheduleNotFound";

/// Where the values of a run came from, to name fields in messages.
#[derive(Debug, Clone)]
pub enum Origin {
    /// The run's own spec (a fired run carries everything).
    Own,
    /// Resolved from this Schedule when the run started.
    Schedule(String),
}

impl Origin {
    /// The field path of `field` (`backend`, `selector`, `concurrency`, `retention`,
    /// `readDataSubset`) in the object it came from.
    pub fn field(&self, field: &str) -> String {
        match self {
            Origin::Own => format!("spec.{field}"),
            Origin::Schedule(name) => {
                let within = match field {
                    "selector" | "concurrency" => format!("spec.backup.{field}"),
                    "retention" => "spec.prune.retention".into(),
                    "readDataSubset" => "spec.check.readDataSubset".into(),
                    other => format!("spec.{other}"),
                };
                format!("Schedule {name}: {within}")
            }
        }
    }
}

/// The run's complete spec: its own, or resolved once from its Schedule (recorded in the status).
async fn resolve<K: RunObject>(
    ctx: &Ctx,
    run: &K,
    recorded: Option<&ResolvedSpec>,
) -> Result<(ResolvedSpec, Origin), Finding> {
    if run.backend().is_some() {
        // A fired run carries copies of its Schedule's fields: messages name them there.
        let fired = run.labels().contains_key(crate::runs::LABEL_SCHEDULE);
        let origin = match run.schedule_ref() {
            Some(r) if fired => Origin::Schedule(r.name.clone()),
            _ => Origin::Own,
        };
        return Ok((run.resolve_with(None), origin));
    }
    if let Some(r) = recorded {
        return Ok((
            r.clone(),
            Origin::Schedule(r.schedule.clone().unwrap_or_default()),
        ));
    }
    let Some(r) = run.schedule_ref() else {
        return Err(Finding::new(
            backend::INVALID_BACKEND,
            "spec.backend: set a backend, or spec.scheduleRef to use a Schedule's",
        ));
    };
    let namespace = run.namespace().unwrap_or_default();
    let schedule = Api::<Schedule>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(&r.name)
        .await
        .map_err(|e| {
            Finding::new(
                SCHEDULE_NOT_FOUND,
                format!(
                    "spec.scheduleRef.name: reading Schedule {namespace}/{}: {}",
                    r.name,
                    errors::sentence(&e)
                ),
            )
        })?
        .ok_or_else(|| {
            Finding::new(
                SCHEDULE_NOT_FOUND,
                format!(
                    "spec.scheduleRef.name: Schedule {namespace}/{} not found",
                    r.name
                ),
            )
        })?;
    Ok((
        run.resolve_with(Some(&schedule)),
        Origin::Schedule(r.name.clone()),
    ))
}

/// A started run.
pub struct Begun {
    pub status: StatusHandle,
    writer: tokio::task::JoinHandle<RunStatus>,
    /// The run was already Running: a coordinator restarted in the middle of it.
    pub resumed: bool,
    /// The status as it was when this attempt began (an earlier attempt's items included).
    pub before: RunStatus,
    pub spec: ResolvedSpec,
    pub origin: Origin,
    pub repository: pb::Repository,
}

/// Claims and starts a run: reads it fresh from the API server (a finished run is never executed
/// again, whatever the cache says), resolves its spec, and marks it Running with a write that only
/// succeeds on the version it read. `Ok(None)` when there is nothing to do: finished, gone, taken,
/// or failed for bad input (then with a condition and an Event naming the field).
pub async fn begin<K: RunObject>(ctx: &Ctx, run: &K) -> Result<Option<Begun>, kube::Error> {
    let namespace = run.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(fresh) = api.get_opt(&run.name_any()).await? else {
        return Ok(None);
    };
    if fresh.uid() != run.uid() || is_terminal(fresh.run_status().and_then(|s| s.phase)) {
        return Ok(None);
    }
    let mut status = fresh.run_status().cloned().unwrap_or_default();
    let resumed = status.phase == Some(RunPhase::Running);
    if resumed {
        tracing::info!(kind = K::ACTION, namespace = %namespace, run = %run.name_any(), "resuming a run interrupted by a coordinator restart");
    }
    let resolved = resolve(ctx, &fresh, status.resolved.as_ref()).await;
    status.phase = Some(RunPhase::Running);
    if status.start_time.is_none() {
        status.start_time = Some(now_rfc3339());
    }
    // Only what was resolved from a Schedule is recorded; a fired run's spec already says it all.
    if let Ok((spec, Origin::Schedule(_))) = &resolved
        && fresh.backend().is_none()
    {
        status.resolved = Some(spec.clone());
    }
    let rv = fresh.resource_version();
    match apply_status(&api, &fresh.name_any(), &status, rv.as_deref()).await {
        Ok(()) => {}
        // Someone else changed the run since our read (another attempt finished it): leave it.
        Err(kube::Error::Api(e)) if e.code == 409 => return Ok(None),
        Err(e) => return Err(e),
    }
    let before = status.clone();
    let (handle, writer) = StatusWriter::spawn(ctx.client.clone(), &fresh, status);
    let (spec, origin) = match resolved {
        Ok(r) => r,
        Err(f) => {
            finish(ctx, &fresh, handle, writer, RunPhase::Failed, &f).await;
            return Ok(None);
        }
    };
    let at = origin.field("backend");
    match backend::resolve(
        &Secrets::Api(ctx.client.clone()),
        &ctx.config.allowed_endpoint,
        &namespace,
        &spec.backend,
        &at,
    )
    .await
    {
        Ok(repository) => {
            // A backend in rotation: the current password must open the repository first.
            if let Err(f) =
                rotation::ensure_current_key(ctx, &fresh, &handle, &spec.backend, &at, &repository)
                    .await
            {
                finish(ctx, &fresh, handle, writer, RunPhase::Failed, &f).await;
                return Ok(None);
            }
            Ok(Some(Begun {
                status: handle,
                writer,
                resumed,
                before,
                spec,
                origin,
                repository,
            }))
        }
        Err(f) => {
            finish(ctx, &fresh, handle, writer, RunPhase::Failed, &f).await;
            Ok(None)
        }
    }
}

impl Begun {
    /// Ends the run; see [`finish`].
    pub async fn finish<K: RunObject>(
        self,
        ctx: &Ctx,
        run: &K,
        phase: RunPhase,
        finding: &Finding,
    ) {
        finish(ctx, run, self.status, self.writer, phase, finding).await;
    }
}

/// Ends a run: phase, completion time and the `Succeeded` condition, written by the run's writer as
/// its last write; then an Event and the metrics. `status` must be the last handle to the writer.
async fn finish<K: RunObject>(
    ctx: &Ctx,
    run: &K,
    status: StatusHandle,
    writer: tokio::task::JoinHandle<RunStatus>,
    phase: RunPhase,
    finding: &Finding,
) {
    let generation = run.meta().generation;
    let (reason, message) = (
        finding.reason,
        errors::bounded(&finding.message, errors::CONDITION_MESSAGE_MAX),
    );
    status.run(move |s| {
        s.phase = Some(phase);
        s.completion_time = Some(now_rfc3339());
        for i in &mut s.items {
            i.percent_done = None;
        }
        conditions::set(
            &mut s.conditions,
            conditions::SUCCEEDED,
            phase == RunPhase::Succeeded,
            reason,
            &message,
            generation,
        );
    });
    drop(status);
    let final_status = writer.await.unwrap_or_default();
    let seconds = final_status
        .start_time
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| (chrono::Utc::now() - t.to_utc()).as_seconds_f64())
        .unwrap_or(0.0);
    ctx.metrics
        .runs
        .with_label_values(&[K::ACTION, phase_label(phase)])
        .inc();
    ctx.metrics
        .run_duration
        .with_label_values(&[K::ACTION])
        .observe(seconds.max(0.0));
    // The run held or waited for repository locks: the lock gauges say what it left behind.
    if let Some(s) = run.schedule_ref() {
        ctx.inspector
            .run_ended(&run.namespace().unwrap_or_default(), &s.name);
    }
    if phase == RunPhase::Succeeded {
        ctx.notifier.normal(run, "Run", finding).await;
    } else {
        ctx.notifier.warn(run, "Run", finding).await;
    }
    tracing::info!(
        kind = K::ACTION,
        namespace = %run.namespace().unwrap_or_default(),
        run = %run.name_any(),
        phase = phase_label(phase),
        seconds,
        "run finished"
    );
}

/// What an agent's progress says about repository locks: a removed stale lock becomes an Event on
/// the run and counts in `stowage_repository_lock_removals_total`; the return value is the waiting
/// message while the operation waits for a lock (`None` otherwise).
pub fn lock_news<K: RunObject>(ctx: &Arc<Ctx>, run: &Arc<K>, p: &pb::Progress) -> Option<String> {
    if !p.removed_lock.is_empty() {
        let ns = run.namespace().unwrap_or_default();
        let schedule = run
            .schedule_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default();
        ctx.metrics
            .lock_removals
            .with_label_values(&[ns.as_str(), schedule.as_str()])
            .inc();
        let (ctx, run) = (Arc::clone(ctx), Arc::clone(run));
        let finding = Finding::new("StaleLockRemoved", p.removed_lock.clone());
        tokio::spawn(async move {
            ctx.notifier.warn(run.as_ref(), "Unlock", &finding).await;
        });
    }
    (p.phase == pb::Phase::WaitingForLock as i32).then(|| p.message.clone())
}

/// An item's "waiting for the repository lock" note: set while the agent says it waits, cleared
/// once, when it moves on.
pub struct LockWait {
    key: status::ItemKey,
    waiting: bool,
}

impl LockWait {
    pub fn new(key: status::ItemKey) -> Self {
        Self {
            key,
            waiting: false,
        }
    }

    /// Notes what `p` says about locks in the item's status.
    pub fn progress<K: RunObject>(
        &mut self,
        ctx: &Arc<Ctx>,
        run: &Arc<K>,
        status: &StatusHandle,
        p: &pb::Progress,
    ) {
        match lock_news(ctx, run, p) {
            Some(message) => {
                status.waiting(self.key.clone(), Some(message));
                self.waiting = true;
            }
            None if self.waiting => {
                status.waiting(self.key.clone(), None);
                self.waiting = false;
            }
            None => {}
        }
    }
}

/// The id the agents log and tag snapshots with.
pub fn run_id<K: RunObject>(run: &K) -> String {
    format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any())
}
