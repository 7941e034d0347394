//! The Schedule reconciler: validates the spec (conditions and Events name the field), fires runs
//! at their times (owned by the Schedule, never two of one action at once), accounts for fire times
//! missed while no coordinator was leading, publishes the next fire times, and keeps the run
//! history at `keepRuns`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};

use crate::backend;
use crate::conditions::{self, Finding};
use crate::context::Ctx;
use crate::crd::{
    ActionTimes, Backup, BackupSpec, Check, CheckSpec, Prune, PruneSpec, Retention, RunPhase,
    Schedule, ScheduleRef, ScheduleStatus,
};
use crate::cron::CronSchedule;
use crate::firing::due;
use crate::plan::selector_matches;
use crate::restic_fields;
use crate::runs::{LABEL_ACTION, LABEL_SCHEDULE, RunObject, is_terminal};

pub const ACTIONS: [&str; 3] = ["backup", "check", "prune"];

fn slot<'a>(t: &'a mut ActionTimes, action: &str) -> Option<&'a mut Option<String>> {
    match action {
        "backup" => Some(&mut t.backup),
        "check" => Some(&mut t.check),
        "prune" => Some(&mut t.prune),
        _ => None,
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn expression<'a>(s: &'a Schedule, action: &str) -> Option<&'a str> {
    match action {
        "backup" => s.spec.backup.as_ref().map(|a| a.schedule.as_str()),
        "check" => s.spec.check.as_ref().map(|a| a.schedule.as_str()),
        "prune" => s.spec.prune.as_ref().map(|a| a.schedule.as_str()),
        _ => None,
    }
}

/// A label value (≤ 63 characters) standing for `name`.
pub fn label_value(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_string();
    }
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut base: String = name.chars().take(54).collect();
    while base.ends_with(['-', '.']) {
        base.pop();
    }
    format!("{base}-{:08x}", h & 0xffff_ffff)
}

/// `<schedule>-<action>-<yyyymmddhhmm>`: one object per fire time, so a repeated attempt to create
/// it (after a restart) finds it instead of making a second run.
pub fn run_name(schedule: &str, action: &str, at: DateTime<Utc>) -> String {
    let base: String = schedule.chars().take(200).collect();
    format!("{base}-{action}-{}", at.format("%Y%m%d%H%M"))
}

/// Everything wrong with the spec, each naming its field.
async fn validate(
    ctx: &Ctx,
    s: &Schedule,
    crons: &mut Vec<(&'static str, CronSchedule)>,
) -> (Vec<Finding>, bool, Option<Finding>) {
    let ns = s.namespace().unwrap_or_default();
    let name = s.name_any();
    let mut problems = Vec::new();
    for action in ACTIONS {
        if let Some(expr) = expression(s, action) {
            match CronSchedule::parse(expr, &ns, &name, action) {
                Ok(c) => crons.push((action, c)),
                Err(e) => problems.push(Finding::new(
                    "InvalidSchedule",
                    format!("spec.{action}.schedule: {e}"),
                )),
            }
        }
    }
    if s.spec.backup.is_none() && s.spec.check.is_none() && s.spec.prune.is_none() {
        problems.push(Finding::new(
            "NothingScheduled",
            "spec: set at least one of backup, check, prune",
        ));
    }
    if let Some(p) = &s.spec.prune {
        if p.retention == Retention::default() {
            problems.push(Finding::new(
                "NoRetention",
                "spec.prune.retention: set at least one keep rule",
            ));
        }
        problems.extend(restic_fields::retention(
            &p.retention,
            "spec.prune.retention",
        ));
    }
    if let Some(subset) = s
        .spec
        .check
        .as_ref()
        .and_then(|c| c.read_data_subset.as_deref())
        && let Some(f) = restic_fields::read_data_subset(subset, "spec.check.readDataSubset")
    {
        problems.push(f);
    }
    let backend_ok = match backend::resolve(&ctx.client, &ns, &s.spec.backend, "spec.backend").await
    {
        Ok(_) => true,
        Err(f) => {
            problems.push(f);
            false
        }
    };
    let mut selection = None;
    if let Some(b) = &s.spec.backup {
        let sel = b.selector.as_ref();
        match selector_matches(sel, &BTreeMap::new()) {
            Err(e) => problems.push(Finding::new(
                "InvalidSelector",
                format!("spec.backup.{}: {}", e.field, e.reason),
            )),
            Ok(_) => {
                let pvcs = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns)
                    .list(&ListParams::default())
                    .await;
                if let Ok(pvcs) = pvcs {
                    let any = pvcs
                        .items
                        .iter()
                        .any(|p| selector_matches(sel, p.labels()).unwrap_or(false));
                    selection = Some(if any {
                        Finding::new(
                            "Matched",
                            "the backup selector matches PersistentVolumeClaims",
                        )
                    } else if sel.is_some() {
                        Finding::new(
                            "NothingSelected",
                            format!(
                                "spec.backup.selector matches no PersistentVolumeClaim in namespace {ns}"
                            ),
                        )
                    } else {
                        Finding::new(
                            "NothingSelected",
                            format!("namespace {ns} has no PersistentVolumeClaim to back up"),
                        )
                    });
                }
            }
        }
    }
    (problems, backend_ok, selection)
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
    let (problems, backend_ok, selection) = validate(&ctx, &s, &mut crons).await;

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
            fire(&ctx, &s, action, at).await?;
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
                soonest = Some(soonest.map_or(t, |x| x.min(t)));
            }
            None => {
                let _ = ctx.metrics.next_run.remove_label_values(&labels);
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
    status.observed_generation = generation;

    // History and last success.
    let keep = s.spec.keep_runs.unwrap_or(ctx.config.keep_runs) as usize;
    if let Some(t) = prune_history::<Backup>(&ctx, &s, keep).await? {
        let newer = status
            .last_success_time
            .as_deref()
            .is_none_or(|cur| cur < t.as_str());
        if newer {
            status.last_success_time = Some(t);
        }
    }
    prune_history::<Check>(&ctx, &s, keep).await?;
    prune_history::<Prune>(&ctx, &s, keep).await?;
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
        write_status(&api, &name, &status).await?;
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

async fn write_status(
    api: &Api<Schedule>,
    name: &str,
    status: &ScheduleStatus,
) -> Result<(), kube::Error> {
    // A merge patch leaves out what is absent: clear fields that became empty explicitly.
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(obj) = value.as_object_mut() {
        for key in ["nextRuns", "lastSuccessTime", "conditions"] {
            obj.entry(key).or_insert(serde_json::Value::Null);
        }
    }
    let patch = serde_json::json!({ "status": value });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
}

fn owner(s: &Schedule) -> OwnerReference {
    OwnerReference {
        api_version: Schedule::api_version(&()).into_owned(),
        kind: Schedule::kind(&()).into_owned(),
        name: s.name_any(),
        uid: s.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

fn list_params(s: &Schedule, action: &str) -> ListParams {
    ListParams::default().labels(&format!(
        "{LABEL_SCHEDULE}={},{LABEL_ACTION}={action}",
        label_value(&s.name_any())
    ))
}

/// Creates the run for fire time `at`, unless the previous run of the action is still going.
async fn fire(ctx: &Ctx, s: &Schedule, action: &str, at: DateTime<Utc>) -> Result<(), kube::Error> {
    let schedule_ref = Some(ScheduleRef { name: s.name_any() });
    match action {
        "backup" => {
            let b = s.spec.backup.clone().unwrap_or_default();
            let spec = BackupSpec {
                backend: None,
                schedule_ref,
                selector: b.selector,
                concurrency: b.concurrency,
            };
            create_run(ctx, s, at, Backup::new("", spec)).await
        }
        "check" => {
            let c = s.spec.check.clone().unwrap_or_default();
            let spec = CheckSpec {
                backend: None,
                schedule_ref,
                read_data_subset: c.read_data_subset,
            };
            create_run(ctx, s, at, Check::new("", spec)).await
        }
        "prune" => {
            let p = s.spec.prune.clone().unwrap_or_default();
            let spec = PruneSpec {
                backend: None,
                schedule_ref,
                retention: Some(p.retention),
            };
            create_run(ctx, s, at, Prune::new("", spec)).await
        }
        _ => Ok(()),
    }
}

async fn create_run<K: RunObject>(
    ctx: &Ctx,
    s: &Schedule,
    at: DateTime<Utc>,
    mut run: K,
) -> Result<(), kube::Error> {
    let ns = s.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let running: Vec<String> = api
        .list(&list_params(s, K::ACTION))
        .await?
        .items
        .iter()
        .filter(|r| !is_terminal(r.run_status().and_then(|st| st.phase)))
        .map(|r| r.name_any())
        .collect();
    let name = run_name(&s.name_any(), K::ACTION, at);
    if let Some(prev) = running.iter().find(|n| **n != name) {
        ctx.metrics.skipped_runs.inc();
        let f = Finding::new(
            "Skipped",
            format!(
                "{} at {}: skipped, the previous {} run {prev} is still running",
                K::ACTION,
                rfc3339(at),
                K::ACTION
            ),
        );
        ctx.notifier.warn(s, "Schedule", &f).await;
        return Ok(());
    }
    let meta = run.meta_mut();
    meta.name = Some(name.clone());
    meta.namespace = Some(ns.clone());
    meta.labels = Some(
        [
            (LABEL_SCHEDULE.to_string(), label_value(&s.name_any())),
            (LABEL_ACTION.to_string(), K::ACTION.to_string()),
        ]
        .into(),
    );
    meta.owner_references = Some(vec![owner(s)]);
    match api.create(&PostParams::default(), &run).await {
        Ok(_) => {
            tracing::info!(namespace = %ns, schedule = %s.name_any(), action = K::ACTION, run = %name, "fired");
            let f = Finding::new("Fired", format!("created {} run {name}", K::ACTION));
            ctx.notifier.normal(s, "Schedule", &f).await;
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes finished runs beyond `keep` (newest kept); returns the newest Succeeded completion time.
async fn prune_history<K: RunObject>(
    ctx: &Ctx,
    s: &Schedule,
    keep: usize,
) -> Result<Option<String>, kube::Error> {
    let ns = s.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let mut finished: Vec<K> = api
        .list(&list_params(s, K::ACTION))
        .await?
        .items
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

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
        let long = "a".repeat(100);
        let l = label_value(&long);
        assert!(l.len() <= 63);
        assert_ne!(label_value(&format!("{long}x")), l);
        assert_eq!(label_value("nightly"), "nightly");
    }
}
