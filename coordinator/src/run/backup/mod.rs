//! A Backup run: plan which node's agent reads each selected volume (from the watch caches), run one
//! [`VolumeTask`] per volume under the run's concurrency limits, and record one status item per
//! volume through the run's status writer. Resuming after a coordinator restart never backs up a
//! finished volume again: items already done are kept, and for the others the agents are asked
//! whether a snapshot tagged with this run exists (a partial one counts as partial).
//!
//! [`select`] finds the work (volumes, backup commands, PreBackupPods); this module runs it and
//! judges the outcome.

pub(crate) mod select;

pub(crate) use select::command_timeout;
use select::{Work, select};

use std::sync::Arc;

use kube::ResourceExt;
use stowage_proto::v1 as pb;
use tonic::Code;

use super::command::CommandTask;
use super::hooks::PodHooks;
use super::volume::{Limits, VolumeTask};
use super::{begin, run_id};
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::dispatch::{self, DispatchError};
use crate::errors;
use crate::prebackup_pod;
use crate::runs::phase_of;
use stowage_api::{Backup, ItemStatus, RunPhase};

pub const NOTHING_SELECTED: &str = "NothingSelected";
/// A backup command's time limit unless annotated (1 h).
const COMMAND_TIMEOUT_SECONDS: u32 = 3600;
pub const INVALID_SELECTOR: &str = "InvalidSelector";
pub const TOO_MANY_ITEMS: &str = "TooManyItems";
/// The most items (volumes and commands) one Backup may have: its status must fit in one object
/// with every item's identity, however long the names (see `status::STATUS_BUDGET`).
pub const MAX_RUN_ITEMS: usize = 1000;

pub async fn execute(ctx: Arc<Ctx>, run: Arc<Backup>) -> Result<(), kube::Error> {
    let namespace = run.namespace().unwrap_or_default();
    let Some(begun) = begin(ctx.as_ref(), run.as_ref()).await? else {
        return Ok(());
    };
    let selector_field = begun.origin.field("selector");
    let work = match select(
        &ctx,
        &run_id(run.as_ref()),
        &namespace,
        begun.spec.selector.as_ref(),
        &selector_field,
    ) {
        Ok(w) if w.len() > MAX_RUN_ITEMS => {
            let f = Finding::new(
                TOO_MANY_ITEMS,
                format!(
                    "{selector_field}: the run would back up {} volumes and commands, and a run holds at most {MAX_RUN_ITEMS} (its status must fit in one object); split namespace {namespace} between Schedules with selectors",
                    w.len()
                ),
            );
            begun
                .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
                .await;
            return Ok(());
        }
        Ok(w) => w,
        Err(f) => {
            begun
                .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
                .await;
            return Ok(());
        }
    };
    // One agent opens (or creates) the repository first: parallel first backups must not each
    // initialise it. An unreachable agent is skipped; if none answers, the volumes fail one by one
    // with the reason.
    let location = stowage_common::backend::location(&begun.repository);
    for node in ctx.agents.ready_nodes() {
        if ctx.repository_known(&location) {
            break;
        }
        match dispatch::ensure_repository(&ctx.agents, &node, &begun.repository).await {
            Ok(()) => {
                ctx.remember_repository(&location);
                break;
            }
            Err(e) if e.try_elsewhere() => continue,
            Err(e) => {
                let f = repository_finding(&e, &begun.repository, &begun.origin.field("backend"));
                begun
                    .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, &f)
                    .await;
                return Ok(());
            }
        }
    }
    let selected: Vec<(String, String)> = work.iter().map(Work::key).collect();
    let mut items: Vec<ItemStatus> = Vec::new();
    for i in &begun.before.items {
        let key = (i.namespace.clone(), i.name());
        if i.phase.is_fine() {
            items.push(i.clone());
        } else if !selected.contains(&key) {
            // Items of an earlier attempt no longer selected (PVC deleted or excluded since) must
            // not stay Pending or Running in a finished run.
            let mut i = i.clone();
            i.phase = RunPhase::Failed;
            i.percent_done = None;
            i.error = Some(
                "no longer selected when the run resumed (PVC or pod deleted, or excluded)".into(),
            );
            items.push(i);
        }
    }
    let done: Vec<(String, String)> = items
        .iter()
        .map(|i| (i.namespace.clone(), i.name()))
        .collect();
    let todo: Vec<Work> = work
        .into_iter()
        .filter(|w| !done.contains(&w.key()))
        .collect();
    // Each pod's post-hook runs after the last of its volumes that this attempt backs up.
    let mut per_pod: Vec<(Arc<PodHooks>, usize)> = Vec::new();
    for w in &todo {
        if let Work::Volume { hooks: Some(h), .. } = w {
            match per_pod.iter_mut().find(|(p, _)| Arc::ptr_eq(p, h)) {
                Some((_, n)) => *n += 1,
                None => per_pod.push((Arc::clone(h), 1)),
            }
        }
    }
    for (h, n) in per_pod {
        h.set_tasks(n);
    }
    let pending: Vec<ItemStatus> = todo.iter().map(Work::item).collect();
    let mut listed = items.clone();
    listed.extend(pending);
    begun.status.run(move |s| s.items = listed);
    if let Err(e) = begun.status.flush().await {
        tracing::warn!(run = %run_id(run.as_ref()), error = %errors::sentence(&e), "writing the planned items");
    }
    let limits = Arc::new(Limits::new(begun.spec.concurrency.as_ref()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut spawned = std::collections::HashMap::new();
    for w in todo {
        let planned = w.item();
        let (ctx, limits, status) = (Arc::clone(&ctx), Arc::clone(&limits), begun.status.clone());
        let handle = match w {
            Work::Volume {
                namespace,
                pvc,
                source,
                excludes,
                hooks,
            } => {
                let task = VolumeTask {
                    run: Arc::clone(&run),
                    run_id: run_id(run.as_ref()),
                    namespace,
                    pvc,
                    source,
                    repository: begun.repository.clone(),
                    resumed: begun.resumed,
                    excludes,
                    hooks,
                };
                tasks.spawn(async move {
                    let outcome = task.run(ctx, limits, status.clone()).await;
                    status.item(outcome.clone());
                    outcome
                })
            }
            Work::Command(mut job, prebackup) => {
                job.run_id = run_id(run.as_ref());
                job.repository = begun.repository.clone();
                let task = CommandTask {
                    run: Arc::clone(&run),
                    job: *job,
                    prebackup,
                    resumed: begun.resumed,
                };
                tasks.spawn(async move {
                    let outcome = task.run(ctx, limits, status.clone()).await;
                    status.item(outcome.clone());
                    outcome
                })
            }
            Work::Fail(item) => tasks.spawn(async move {
                status.item((*item).clone());
                *item
            }),
        };
        spawned.insert(handle.id(), planned);
    }
    // The run always completes: a task that ended abnormally still leaves a failed item.
    while let Some(r) = tasks.join_next_with_id().await {
        match r {
            Ok((_, outcome)) => items.push(outcome),
            Err(e) => {
                tracing::error!(run = %run_id(run.as_ref()), error = %e, "a volume task ended abnormally");
                if let Some(planned) = spawned.remove(&e.id()) {
                    let failed = ItemStatus {
                        phase: RunPhase::Failed,
                        error: Some(
                            "the coordinator's task for this item ended abnormally (see its log)"
                                .into(),
                        ),
                        ..planned
                    };
                    begun.status.item(failed.clone());
                    items.push(failed);
                }
            }
        }
    }
    // Pods an earlier attempt of this run started (before a coordinator restart) go too.
    prebackup_pod::release_all(&ctx.client, &ctx.stores.pods, run.as_ref()).await;
    let phase = phase_of(&items);
    let finding = verdict(&items, phase);
    begun
        .finish(ctx.as_ref(), run.as_ref(), phase, &finding)
        .await;
    Ok(())
}

/// What a run's items are, for its condition: volumes, commands, or both.
fn what(items: &[ItemStatus]) -> &'static str {
    let commands = items.iter().filter(|i| i.command.is_some()).count();
    match commands {
        0 => "volumes with data",
        n if n == items.len() => "backup commands",
        _ => "volumes with data and backup commands",
    }
}

/// The run's condition: what succeeded, and each failure (bounded: a run may have thousands).
fn verdict(items: &[ItemStatus], phase: RunPhase) -> Finding {
    let skipped = items
        .iter()
        .filter(|i| i.phase == RunPhase::Skipped)
        .count();
    let failed: Vec<String> = items
        .iter()
        .filter(|i| !i.phase.is_fine())
        .map(|i| {
            format!(
                "{}/{}{}: {}",
                i.namespace,
                i.name(),
                i.node
                    .as_deref()
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default(),
                errors::bounded(i.error.as_deref().unwrap_or("failed"), 300)
            )
        })
        .collect();
    let failures = errors::joined_within(&failed, errors::CONDITION_MESSAGE_MAX - 200);
    let ok = items.len() - failed.len() - skipped;
    let skipped_note = if skipped > 0 {
        format!(" ({skipped} empty volume(s) skipped)")
    } else {
        String::new()
    };
    match phase {
        RunPhase::Succeeded => Finding::new(
            "BackedUp",
            format!("all {ok} {} have a new snapshot{skipped_note}", what(items)),
        ),
        RunPhase::PartiallyFailed => Finding::new(
            "SomeVolumesFailed",
            format!(
                "{ok} of {} {} backed up{skipped_note}; {failures}",
                items.len() - skipped,
                what(items),
            ),
        ),
        _ => Finding::new(
            "AllVolumesFailed",
            format!("nothing was backed up: {failures}"),
        ),
    }
}

/// Why the repository could not be opened, naming the spec field (under `at`) where it can.
fn repository_finding(e: &DispatchError, repository: &pb::Repository, at: &str) -> Finding {
    let DispatchError::Agent { code, message, .. } = e else {
        return Finding::new(
            "RepositoryUnavailable",
            format!("opening the repository: {e}"),
        );
    };
    if *code == Code::InvalidArgument
        && let Some(reason) = message.strip_prefix("repository.local.path: ")
    {
        return Finding::new("LocalPathNotAllowed", format!("{at}.local.path: {reason}"));
    }
    // The agent's wording of restic's exit 10 (restic_wrap::Error::RepositoryNotFound).
    if *code == Code::FailedPrecondition && message.starts_with("no restic repository at") {
        use pb::repository::Backend as B;
        let field = match &repository.backend {
            Some(B::Local(_)) => "local.path",
            Some(B::S3(_)) => "s3.bucket and s3.prefix",
            Some(B::Rest(_)) => "rest.url",
            None => "",
        };
        return Finding::new(
            "RepositoryNotFound",
            format!(
                "{at}.{field}: there is no repository at {}. Stowage creates a repository only on a \
                 Schedule's first runs or with {at}.initialize: true, so that a mistyped location \
                 never starts a new, empty history. Correct the location, or set initialize to \
                 create a repository there.",
                stowage_common::backend::location(repository)
            ),
        );
    }
    Finding::new(
        "RepositoryUnavailable",
        format!("opening the repository: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_failures_make_a_bounded_verdict() {
        let items: Vec<ItemStatus> = (0..1000)
            .map(|i| ItemStatus {
                namespace: "ns".into(),
                pvc: format!("data-{i}"),
                phase: RunPhase::Failed,
                error: Some("x".repeat(2000)),
                ..Default::default()
            })
            .collect();
        let f = verdict(&items, phase_of(&items));
        assert_eq!(f.reason, "AllVolumesFailed");
        assert!(
            f.message.len() <= errors::CONDITION_MESSAGE_MAX,
            "{}",
            f.message.len()
        );
        assert!(
            f.message.ends_with("more"),
            "{}",
            &f.message[f.message.len() - 40..]
        );
    }
}
