//! The run history: finished runs beyond `keepRuns` are deleted, newest kept.

use std::sync::Arc;

use kube::api::DeleteParams;
use kube::{Api, ResourceExt};

use super::fire::runs_of;
use crate::context::Ctx;
use crate::runs::{RunObject, is_terminal};
use stowage_api::{Check, ItemStatus, Prune, RepositoryFigures, RunPhase, Schedule, Verify};

/// Deletes finished runs beyond `keep` (newest kept); returns the newest Succeeded completion time.
pub(super) async fn prune_history<K: RunObject>(
    ctx: &Ctx,
    s: &Schedule,
    keep: usize,
) -> Result<Option<String>, kube::Error> {
    let ns = s.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let mut finished: Vec<Arc<K>> = runs_of::<K>(ctx, s)
        .into_iter()
        .filter(|r| is_terminal(r.run_status().and_then(|st| st.phase)))
        .collect();
    finished.sort_by(|a, b| {
        b.meta()
            .creation_timestamp
            .cmp(&a.meta().creation_timestamp)
            .then_with(|| b.name_any().cmp(&a.name_any()))
    });
    let last_success = finished
        .iter()
        .filter_map(|r| r.run_status())
        .filter(|st| st.phase == Some(RunPhase::Succeeded))
        .filter_map(|st| st.completion_time.clone())
        .max();
    for old in finished.iter().skip(keep) {
        match api
            .delete(&old.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = %ns, run = %old.name_any(), "deleted old run (keepRuns)")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(last_success)
}

/// What the newest Check that judged the repository found: a passing Check, or one that failed
/// with `CheckFailed` (restic found damage or could not read the repository). Checks that never
/// reached restic (no agent, bad input) say nothing about the repository and are passed over.
pub(super) struct CheckVerdict {
    pub healthy: bool,
    pub message: String,
    pub completed: String,
}

pub(super) fn last_check_verdict(ctx: &Ctx, s: &Schedule) -> Option<CheckVerdict> {
    runs_of::<Check>(ctx, s)
        .iter()
        .filter_map(|r| {
            let st = r.status.as_ref()?;
            let cond = st
                .conditions
                .iter()
                .find(|c| c.type_ == crate::conditions::SUCCEEDED)?;
            let healthy = match st.phase? {
                RunPhase::Succeeded => true,
                RunPhase::Failed if cond.reason == "CheckFailed" => false,
                _ => return None,
            };
            Some(CheckVerdict {
                healthy,
                message: format!("Check {}: {}", r.name_any(), cond.message),
                completed: st.completion_time.clone()?,
            })
        })
        .max_by(|a, b| a.completed.cmp(&b.completed))
}

/// What the newest Verify that ran drills found, and, per identity, the completion time of its
/// newest successful drill among the kept runs (what `stowage_volume_last_verified_timestamp_seconds`
/// says, also after a coordinator restart).
pub(super) struct VerifyHistory {
    pub newest: Option<CheckVerdict>,
    pub verified: Vec<(ItemStatus, String)>,
}

pub(super) fn verify_history(ctx: &Ctx, s: &Schedule) -> VerifyHistory {
    let runs = runs_of::<Verify>(ctx, s);
    let mut verified = Vec::new();
    let mut newest: Option<CheckVerdict> = None;
    for r in &runs {
        let Some(st) = r.status.as_ref() else {
            continue;
        };
        let (Some(phase), Some(done)) = (st.phase, st.completion_time.clone()) else {
            continue;
        };
        for i in st.items.iter().filter(|i| i.phase == RunPhase::Succeeded) {
            verified.push((i.clone(), done.clone()));
        }
        // A run that drilled nothing (bad input, no agent, no snapshot yet) says nothing about the
        // snapshots.
        if st.items.iter().all(|i| i.phase == RunPhase::Skipped) || !is_terminal(Some(phase)) {
            continue;
        }
        let message = st
            .conditions
            .iter()
            .find(|c| c.type_ == crate::conditions::SUCCEEDED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        if newest.as_ref().is_none_or(|n| n.completed < done) {
            newest = Some(CheckVerdict {
                healthy: phase == RunPhase::Succeeded,
                message: format!("Verify {}: {message}", r.name_any()),
                completed: done,
            });
        }
    }
    VerifyHistory { newest, verified }
}

/// The repository's figures from the newest Check or Prune that reported them.
pub(super) fn last_figures(ctx: &Ctx, s: &Schedule) -> Option<RepositoryFigures> {
    let checks = runs_of::<Check>(ctx, s);
    let prunes = runs_of::<Prune>(ctx, s);
    let figures = |st: Option<&stowage_api::RunStatus>| st.and_then(|st| st.repository.clone());
    checks
        .iter()
        .filter_map(|r| figures(r.status.as_ref()))
        .chain(prunes.iter().filter_map(|r| figures(r.status.as_ref())))
        .max_by(|a, b| a.time.cmp(&b.time))
}
