//! Executing runs. A run executes in a task owned by the leader; its status object is the record a
//! restarted coordinator resumes from.

pub mod backup;
pub mod maintenance;

use std::sync::Arc;

use kube::{Api, ResourceExt};
use stowage_proto::v1 as pb;

use crate::backend;
use crate::conditions::{self, Finding};
use crate::context::Ctx;
use crate::crd::{BackendSpec, RunPhase, Schedule, ScheduleRef};
use crate::runs::{RunObject, StatusWriter, now_rfc3339, phase_label};

pub const SCHEDULE_NOT_FOUND: &str = "ScheduleNotFound";

/// The repository of a run: its own `backend`, or the one of the Schedule it references.
pub async fn resolve_backend(
    ctx: &Ctx,
    namespace: &str,
    own: Option<&BackendSpec>,
    schedule_ref: Option<&ScheduleRef>,
) -> Result<(pb::Repository, Option<Schedule>), Finding> {
    if let Some(spec) = own {
        let repo = backend::resolve(&ctx.client, namespace, spec, "spec.backend").await?;
        return Ok((repo, None));
    }
    let Some(r) = schedule_ref else {
        return Err(Finding::new(
            backend::INVALID_BACKEND,
            "spec.backend: set a backend, or spec.scheduleRef to use a Schedule's",
        ));
    };
    let api: Api<Schedule> = Api::namespaced(ctx.client.clone(), namespace);
    let schedule = api.get_opt(&r.name).await.map_err(|e| {
        Finding::new(
            SCHEDULE_NOT_FOUND,
            format!(
                "spec.scheduleRef.name: reading Schedule {namespace}/{}: {e}",
                r.name
            ),
        )
    })?;
    let Some(schedule) = schedule else {
        return Err(Finding::new(
            SCHEDULE_NOT_FOUND,
            format!(
                "spec.scheduleRef.name: Schedule {namespace}/{} not found",
                r.name
            ),
        ));
    };
    let at = format!("Schedule {}: spec.backend", r.name);
    let mut repo = backend::resolve(&ctx.client, namespace, &schedule.spec.backend, &at).await?;
    // A Schedule that never backed up successfully may create its repository; once it has a
    // history, a missing repository is a mistake in the location, never a reason to start anew.
    repo.auto_init = schedule.spec.backend.initialize.unwrap_or_else(|| {
        schedule
            .status
            .as_ref()
            .is_none_or(|s| s.last_success_time.is_none())
    });
    Ok((repo, Some(schedule)))
}

/// Marks a run Running (keeping the start time of an earlier attempt); whether it was already.
async fn start<K: RunObject>(writer: &StatusWriter<K>) -> Result<bool, kube::Error> {
    let resumed = writer.snapshot().phase == Some(RunPhase::Running);
    writer.update(|s| {
        s.phase = Some(RunPhase::Running);
        if s.start_time.is_none() {
            s.start_time = Some(now_rfc3339());
        }
    });
    writer.flush().await?;
    Ok(resumed)
}

/// A started run with its repository resolved.
pub struct Begun<K: RunObject> {
    pub writer: Arc<StatusWriter<K>>,
    /// The run was already Running: a coordinator restarted in the middle of it.
    pub resumed: bool,
    pub repository: pb::Repository,
    /// The Schedule of `spec.scheduleRef`, when the run has one.
    pub schedule: Option<Schedule>,
}

/// Marks the run Running and resolves its repository. `Ok(None)` when the input was bad: the run
/// has then been failed, with a condition and an Event naming the field.
pub async fn begin<K: RunObject>(ctx: &Ctx, run: &K) -> Result<Option<Begun<K>>, kube::Error> {
    let namespace = run.namespace().unwrap_or_default();
    let writer = StatusWriter::new(ctx.client.clone(), run);
    let resumed = start(&writer).await?;
    if resumed {
        tracing::info!(kind = K::ACTION, namespace = %namespace, run = %run.name_any(), "resuming a run interrupted by a coordinator restart");
    }
    match resolve_backend(ctx, &namespace, run.backend(), run.schedule_ref()).await {
        Ok((repository, schedule)) => Ok(Some(Begun {
            writer,
            resumed,
            repository,
            schedule,
        })),
        Err(f) => {
            fail(ctx, run, &writer, &f).await?;
            Ok(None)
        }
    }
}

/// Ends a run: phase, completion time, the `Succeeded` condition, an Event and the metrics.
pub async fn finish<K: RunObject>(
    ctx: &Ctx,
    run: &K,
    writer: &StatusWriter<K>,
    phase: RunPhase,
    finding: &Finding,
) -> Result<(), kube::Error> {
    let generation = run.meta().generation;
    writer.update(|s| {
        s.phase = Some(phase);
        s.completion_time = Some(now_rfc3339());
        conditions::set(
            &mut s.conditions,
            conditions::SUCCEEDED,
            phase == RunPhase::Succeeded,
            finding.reason,
            &finding.message,
            generation,
        );
    });
    writer.flush().await?;
    let status = writer.snapshot();
    let seconds = status
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
    Ok(())
}

/// Fails a run before any work (bad input): the condition and Event name the field.
pub async fn fail<K: RunObject>(
    ctx: &Ctx,
    run: &K,
    writer: &StatusWriter<K>,
    finding: &Finding,
) -> Result<(), kube::Error> {
    finish(ctx, run, writer, RunPhase::Failed, finding).await
}

/// The id the agents log and tag snapshots with.
pub fn run_id<K: RunObject>(run: &K) -> String {
    format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any())
}

pub type Shared<K> = Arc<StatusWriter<K>>;
