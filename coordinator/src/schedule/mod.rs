//! The Schedule reconciler, one concern per module, run in this order on every pass:
//!
//! - [`validate`]: everything wrong with the spec, each finding naming its field (from the watch
//!   caches: Secrets by key name, PVCs for the `VolumesSelected` condition);
//! - [`fire`]: create the runs that are due (self-contained, owned by the Schedule, never two of one
//!   action at once), accounting for fire times missed while no coordinator was leading;
//! - here: publish the next fire times and the conditions, then write the status;
//! - [`history`]: keep the run history at `keepRuns` and find the last success.
//!
//! A pass makes no LIST and no GET: it reads the caches, and writes what changed.

mod fire;
mod history;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::conditions::{self, Finding};
use crate::context::Ctx;
use crate::firing::due;
use stowage_api::{ActionTimes, Backup, Check, Prune, Schedule, Verify};

pub use fire::run_name;

pub const ACTIONS: [&str; 4] = ["backup", "check", "prune", "verify"];

fn slot<'a>(t: &'a mut ActionTimes, action: &str) -> Option<&'a mut Option<String>> {
    match action {
        "backup" => Some(&mut t.backup),
        "check" => Some(&mut t.check),
        "prune" => Some(&mut t.prune),
        "verify" => Some(&mut t.verify),
        _ => None,
    }
}

pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub(crate) fn expression<'a>(s: &'a Schedule, action: &str) -> Option<&'a str> {
    match action {
        "backup" => s.spec.backup.as_ref().map(|a| a.schedule.as_str()),
        "check" => s.spec.check.as_ref().map(|a| a.schedule.as_str()),
        "prune" => s.spec.prune.as_ref().map(|a| a.schedule.as_str()),
        "verify" => s.spec.verify.as_ref().map(|a| a.schedule.as_str()),
        _ => None,
    }
}

pub async fn reconcile(s: Arc<Schedule>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    let ns = s.namespace().unwrap_or_default();
    let name = s.name_any();
    let api: Api<Schedule> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Utc::now();
    let before = s.status.clone().unwrap_or_default();
    let mut status = before.clone();
    let generation = s.metadata.generation;
    let uid = s.uid().unwrap_or_default();

    let mut crons = Vec::new();
    let (problems, backend_ok, selection) = validate::validate(&ctx, &s, &mut crons).await;

    // Fire what is due.
    let mut last = status.last_scheduled.clone().unwrap_or_default();
    for (action, cron) in &crons {
        let Some(entry) = slot(&mut last, action) else {
            continue;
        };
        let from_status = entry
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|d| d.to_utc());
        let previous = ctx.handled_up_to(&uid, action, from_status);
        let Some(previous) = previous.filter(|_| !s.spec.paused && backend_ok) else {
            // New, paused or unusable: nothing before now will ever run.
            *entry = Some(rfc3339(now));
            ctx.set_handled(&uid, action, now);
            continue;
        };
        let d = due(cron, previous, now, ctx.config.missed_run_deadline);
        if d.missed > 0 {
            ctx.metrics.missed_runs.inc_by(d.missed);
            let f = Finding::new(
                "MissedRuns",
                format!(
                    "{} {action} fire time(s) were missed by more than {}s (no coordinator was leading) and will not run",
                    d.missed,
                    ctx.config.missed_run_deadline.as_secs()
                ),
            );
            ctx.notifier.warn(s.as_ref(), "Schedule", &f).await;
        }
        if let Some(at) = d.fire {
            fire::fire(&ctx, &s, action, at).await?;
        }
        if let Some(h) = d.handled_up_to {
            *entry = Some(rfc3339(h));
            ctx.set_handled(&uid, action, h);
        } else {
            *entry = Some(rfc3339(previous));
        }
    }
    status.last_scheduled = Some(last);

    // Publish the next fire times.
    ctx.metrics.schedule_seen(&ns, &name);
    let mut next = ActionTimes::default();
    let mut soonest: Option<DateTime<Utc>> = None;
    for (action, cron) in &crons {
        let labels = [ns.as_str(), name.as_str(), action];
        match cron.next_after(now).filter(|_| !s.spec.paused) {
            Some(t) => {
                if let Some(e) = slot(&mut next, action) {
                    *e = Some(rfc3339(t));
                }
                ctx.metrics
                    .next_run
                    .with_label_values(&labels)
                    .set(t.timestamp() as f64);
                if let Some(after) = cron.next_after(t) {
                    ctx.metrics
                        .period
                        .with_label_values(&labels)
                        .set((after - t).num_seconds() as f64);
                }
                soonest = Some(soonest.map_or(t, |x| x.min(t)));
            }
            None => {
                let _ = ctx.metrics.next_run.remove_label_values(&labels);
                let _ = ctx.metrics.period.remove_label_values(&labels);
            }
        }
    }
    status.next_runs = (!s.spec.paused).then_some(next);

    // Conditions, and an Event when something a user must fix appears or changes.
    let ready = match Finding::joined(&problems) {
        Some(f) => f,
        None if s.spec.paused => Finding::new("Paused", "spec.paused is true: nothing fires"),
        None => Finding::new("Scheduled", "the schedule is valid and armed"),
    };
    if conditions::set(
        &mut status.conditions,
        conditions::READY,
        problems.is_empty(),
        ready.reason,
        &ready.message,
        generation,
    ) && !problems.is_empty()
    {
        ctx.notifier.warn(s.as_ref(), "Validate", &ready).await;
    }
    if let Some(sel) = &selection {
        let ok = sel.reason == "Matched";
        if conditions::set(
            &mut status.conditions,
            conditions::VOLUMES_SELECTED,
            ok,
            sel.reason,
            &sel.message,
            generation,
        ) && !ok
        {
            ctx.notifier.warn(s.as_ref(), "Validate", sel).await;
        }
    }
    // Snapshot ownership is restic tags: whoever has a repository's password can write snapshots
    // that claim any namespace. Schedules of other namespaces at the same location share a trust
    // domain, which deserves a warning (docs/security.md, "Shared repositories").
    let others = ctx
        .schedules
        .get()
        .map(|store| sharing_namespaces(&s, &store.state()))
        .unwrap_or_default();
    // The condition exists only while the location is shared (a warning, not a state to track).
    if others.is_empty() {
        status
            .conditions
            .retain(|c| c.type_ != conditions::SHARED_REPOSITORY);
    } else {
        let shared = Finding::new(
            "SharedRepository",
            format!(
                "Schedules of {} other namespace(s) ({}) use this repository location: anyone with its password can read every namespace's snapshots and write snapshots that claim any namespace; give each trust domain its own repository",
                others.len(),
                crate::errors::joined_within(&others, 512)
            ),
        );
        if conditions::set(
            &mut status.conditions,
            conditions::SHARED_REPOSITORY,
            true,
            shared.reason,
            &shared.message,
            generation,
        ) {
            ctx.notifier.warn(s.as_ref(), "Validate", &shared).await;
        }
    }
    status.observed_generation = generation;

    // History and last success.
    let keep = s.spec.keep_runs.unwrap_or(ctx.config.keep_runs) as usize;
    if let Some(t) = history::prune_history::<Backup>(&ctx, &s, keep).await? {
        let newer = status
            .last_success_time
            .as_deref()
            .is_none_or(|cur| cur < t.as_str());
        if newer {
            status.last_success_time = Some(t);
        }
    }
    history::prune_history::<Check>(&ctx, &s, keep).await?;
    history::prune_history::<Prune>(&ctx, &s, keep).await?;
    history::prune_history::<Verify>(&ctx, &s, keep).await?;
    verification(&ctx, &s, &mut status, generation).await;
    // The repository's size, from the newest Check, Prune or look between runs.
    let between_runs = ctx.inspector.figures(&ns, &name);
    let newest = history::last_figures(&ctx, &s)
        .into_iter()
        .chain(between_runs)
        .max_by(|a, b| a.time.cmp(&b.time));
    if let Some(f) = newest {
        let labels = [ns.as_str(), name.as_str()];
        ctx.metrics
            .repository_snapshots
            .with_label_values(&labels)
            .set(f.snapshots as f64);
        ctx.metrics
            .repository_size
            .with_label_values(&labels)
            .set(f.size_bytes as f64);
        if let Some(created) = f
            .key_created
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        {
            ctx.metrics
                .key_age
                .with_label_values(&labels)
                .set((now - created.to_utc()).num_seconds().max(0) as f64);
        }
        status.repository = Some(f);
    }
    // Repository health, from the newest Check that judged it: loud when it fails.
    if let Some(v) = history::last_check_verdict(&ctx, &s) {
        let labels = [ns.as_str(), name.as_str()];
        let reason = if v.healthy {
            "CheckPassed"
        } else {
            "CheckFailed"
        };
        let finding = Finding::new(reason, v.message.clone());
        if conditions::set(
            &mut status.conditions,
            conditions::REPOSITORY_HEALTHY,
            v.healthy,
            reason,
            &finding.message,
            generation,
        ) && !v.healthy
        {
            ctx.notifier.warn(s.as_ref(), "Check", &finding).await;
        }
        ctx.metrics
            .check_success
            .with_label_values(&labels)
            .set(if v.healthy { 1.0 } else { 0.0 });
        if v.healthy
            && let Ok(t) = DateTime::parse_from_rfc3339(&v.completed)
        {
            ctx.metrics
                .last_check
                .with_label_values(&labels)
                .set(t.timestamp() as f64);
        }
    }
    if let Some(t) = status
        .last_success_time
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    {
        ctx.metrics
            .last_success
            .with_label_values(&[ns.as_str(), name.as_str()])
            .set(t.timestamp() as f64);
    }

    if status != before {
        crate::apply::status(&api, &name, &status, None).await?;
    }
    // Wake up just after the next fire time; re-check invalid specs (a Secret may appear) and
    // selections every minute, everything else at least every 5 minutes.
    let cap = if problems.is_empty() { 300 } else { 60 };
    let wait = soonest
        .and_then(|t| (t - Utc::now()).to_std().ok())
        .map_or(Duration::from_secs(cap), |d| {
            (d + Duration::from_millis(50)).min(Duration::from_secs(cap))
        });
    Ok(Action::requeue(wait.max(Duration::from_millis(200))))
}

/// The other namespaces whose Schedules use `s`'s repository location (sorted, each once).
fn sharing_namespaces(s: &Schedule, all: &[Arc<Schedule>]) -> Vec<String> {
    let ns = s.namespace().unwrap_or_default();
    let Some(mine) = stowage_common::backend::spec_location(&s.spec.backend) else {
        return Vec::new();
    };
    let mut others: Vec<String> = all
        .iter()
        .filter(|o| o.namespace().is_some_and(|n| n != ns))
        .filter(|o| {
            stowage_common::backend::spec_location(&o.spec.backend).as_deref() == Some(&mine)
        })
        .filter_map(|o| o.namespace())
        .collect();
    others.sort();
    others.dedup();
    others
}

/// The `Verified` condition from the newest Verify that ran drills (loud when it failed), and the
/// last-verified metrics from the kept runs; series of PVCs that no longer exist are removed.
async fn verification(
    ctx: &Ctx,
    s: &Schedule,
    status: &mut stowage_api::ScheduleStatus,
    generation: Option<i64>,
) {
    let ns = s.namespace().unwrap_or_default();
    let h = history::verify_history(ctx, s);
    for (item, done) in &h.verified {
        let Ok(t) = DateTime::parse_from_rfc3339(done) else {
            continue;
        };
        let at = t.timestamp() as f64;
        match &item.command {
            None => ctx.metrics.verified(&item.namespace, &item.pvc, None, at),
            Some(c) => ctx
                .metrics
                .verified(&item.namespace, &c.owner, Some(&c.container), at),
        }
    }
    let live = ctx
        .stores
        .pvcs
        .in_namespace(&ns)
        .iter()
        .map(|p| (p.name.clone(), String::new()))
        .collect();
    ctx.metrics.forget_verified_except(&ns, &live);
    let Some(v) = h.newest else {
        return;
    };
    ctx.metrics
        .verify_success
        .with_label_values(&[ns.as_str(), s.name_any().as_str()])
        .set(if v.healthy { 1.0 } else { 0.0 });
    let reason = if v.healthy {
        "Verified"
    } else {
        "VerifyFailed"
    };
    let finding = Finding::new(reason, v.message);
    if conditions::set(
        &mut status.conditions,
        conditions::VERIFIED,
        v.healthy,
        reason,
        &crate::errors::bounded(&finding.message, crate::errors::CONDITION_MESSAGE_MAX),
        generation,
    ) && !v.healthy
    {
        ctx.notifier.warn(s, "Verify", &finding).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn schedules_of_other_namespaces_at_the_same_location_share_it() {
        let schedule = |ns: &str, backend: serde_json::Value| -> Arc<Schedule> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
                    "metadata": {"name": "nightly", "namespace": ns},
                    "spec": {"backend": backend}
                }))
                .unwrap(),
            )
        };
        let s3 = |endpoint: &str, prefix: &str| {
            serde_json::json!({"repoPasswordSecretRef": {"name": "r", "key": "k"},
                "s3": {"endpoint": endpoint, "bucket": "b", "prefix": prefix,
                       "accessKeyIDSecretRef": {"name": "r", "key": "a"},
                       "secretAccessKeySecretRef": {"name": "r", "key": "s"}}})
        };
        let mine = schedule("shop", s3("https://S3.example.com/", "/team/"));
        let all = vec![
            mine.clone(),
            schedule("bank", s3("https://s3.example.com", "team")),
            schedule("bank", s3("https://s3.example.com", "team")),
            schedule("blog", s3("https://s3.example.com", "blog")),
            schedule("shop", s3("https://s3.example.com", "team")),
        ];
        assert_eq!(sharing_namespaces(&mine, &all), ["bank"]);
        assert!(sharing_namespaces(&all[3], &all).is_empty());
    }

    #[test]
    fn run_names_are_per_fire_time_and_labels_fit() {
        let at = Utc
            .with_ymd_and_hms(2026, 11, 21, 4, 0, 0)
            .single()
            .unwrap();
        assert_eq!(
            run_name("nightly", "backup", at),
            "nightly-backup-202611210400"
        );
        let long = "postgres-primary-database-nightly-offsite-s3-replica-x".repeat(5);
        let n = run_name(&long, "backup", at);
        assert!(n.len() <= 253 && n.ends_with("-backup-202611210400"), "{n}");
    }
}
