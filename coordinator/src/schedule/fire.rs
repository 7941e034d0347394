//! Firing: the run of a fire time, created with everything it needs, under a bounded name.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::PostParams;
use kube::{Api, Resource, ResourceExt};
use stowage_api::contract::ANNOTATION_FULL_SUFFIX;
use stowage_common::names;

use super::rfc3339;
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::runs::{LABEL_ACTION, LABEL_SCHEDULE, RunObject, is_terminal, never_succeeded};
use stowage_api::{
    Backup, BackupSpec, Check, CheckSpec, Prune, PruneSpec, Schedule, ScheduleRef, Verify,
    VerifySpec,
};

/// `<schedule>-<action>-<yyyymmddhhmm>`: one object per fire time, so a repeated attempt to create
/// it (after a restart) finds it instead of making a second run. A long Schedule name is shortened
/// (with a hash) so the whole name stays within Kubernetes' 253 characters.
pub fn run_name(schedule: &str, action: &str, at: DateTime<Utc>) -> String {
    names::with_suffix(
        schedule,
        &format!("{action}-{}", at.format("%Y%m%d%H%M")),
        names::SUBDOMAIN_MAX,
    )
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

/// Whether `run` was fired by `s` (its controller owner), for action `action`.
fn fired_by<K: RunObject>(run: &K, s: &Schedule) -> bool {
    let uid = s.uid().unwrap_or_default();
    run.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == uid)
        && run.labels().get(LABEL_ACTION).map(String::as_str) == Some(K::ACTION)
}

/// The runs of `s` for one action, from the watch cache.
pub(super) fn runs_of<K: RunObject>(ctx: &Ctx, s: &Schedule) -> Vec<Arc<K>> {
    K::store(&ctx.runs)
        .state()
        .into_iter()
        .filter(|r| fired_by(r.as_ref(), s))
        .collect()
}

/// Creates the run for fire time `at`, unless the previous run of the action is still going. The
/// run carries everything it needs (backend, selector, limits, retention): editing the Schedule
/// afterwards changes no run that has fired.
pub(super) async fn fire(
    ctx: &Ctx,
    s: &Schedule,
    action: &str,
    at: DateTime<Utc>,
) -> Result<(), kube::Error> {
    let schedule_ref = Some(ScheduleRef { name: s.name_any() });
    let mut backend = s.spec.backend.clone();
    backend.initialize = Some(backend.initialize.unwrap_or_else(|| never_succeeded(s)));
    match action {
        "backup" => {
            let b = s.spec.backup.clone().unwrap_or_default();
            let spec = BackupSpec {
                backend: Some(backend),
                schedule_ref,
                selector: b.selector,
                concurrency: b.concurrency,
            };
            create_run(ctx, s, at, Backup::new("", spec)).await
        }
        "check" => {
            let c = s.spec.check.clone().unwrap_or_default();
            let spec = CheckSpec {
                backend: Some(backend),
                schedule_ref,
                read_data_subset: c.read_data_subset,
            };
            create_run(ctx, s, at, Check::new("", spec)).await
        }
        "prune" => {
            let p = s.spec.prune.clone().unwrap_or_default();
            let spec = PruneSpec {
                backend: Some(backend),
                schedule_ref,
                retention: Some(p.retention),
                dry_run: false,
            };
            create_run(ctx, s, at, Prune::new("", spec)).await
        }
        "verify" => {
            let v = s.spec.verify.clone().unwrap_or_default();
            let spec = VerifySpec {
                backend: Some(backend),
                schedule_ref,
                // Default: what the Schedule backs up.
                selector: v
                    .selector
                    .or_else(|| s.spec.backup.as_ref().and_then(|b| b.selector.clone())),
                sample_bytes: v.sample_bytes,
            };
            create_run(ctx, s, at, Verify::new("", spec)).await
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
    let name = run_name(&s.name_any(), K::ACTION, at);
    let running: Vec<String> = runs_of::<K>(ctx, s)
        .iter()
        .filter(|r| !is_terminal(r.run_status().and_then(|st| st.phase)))
        .map(|r| r.name_any())
        .collect();
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
    let schedule_label = names::label_value(&s.name_any());
    let meta = run.meta_mut();
    meta.namespace = Some(ns.clone());
    meta.labels = Some(
        [
            (LABEL_SCHEDULE.to_string(), schedule_label.clone()),
            (LABEL_ACTION.to_string(), K::ACTION.to_string()),
        ]
        .into(),
    );
    if schedule_label != s.name_any() {
        meta.annotations = Some(
            [(
                format!("{LABEL_SCHEDULE}{ANNOTATION_FULL_SUFFIX}"),
                s.name_any(),
            )]
            .into(),
        );
    }
    meta.owner_references = Some(vec![owner(s)]);
    // The name is derived from the fire time; if another object already has it, the run gets a
    // second name unique to this Schedule rather than being lost.
    let uid = s.uid().unwrap_or_default();
    let alternative = names::with_suffix(
        &s.name_any(),
        &format!(
            "{}-{}-{}",
            K::ACTION,
            at.format("%Y%m%d%H%M"),
            stowage_common::hash::short(&uid)
        ),
        names::SUBDOMAIN_MAX,
    );
    for candidate in [name.clone(), alternative] {
        run.meta_mut().name = Some(candidate.clone());
        match api.create(&PostParams::default(), &run).await {
            Ok(_) => {
                tracing::info!(namespace = %ns, schedule = %s.name_any(), action = K::ACTION, run = %candidate, "fired");
                let f = Finding::new("Fired", format!("created {} run {candidate}", K::ACTION));
                ctx.notifier.normal(s, "Schedule", &f).await;
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let existing = api.get_opt(&candidate).await?;
                if existing.as_ref().is_some_and(|r| fired_by(r, s)) {
                    // Fired already (a restart, or a cache that lagged our own create).
                    return Ok(());
                }
                tracing::warn!(namespace = %ns, run = %candidate, "a run of that name exists and was not fired by this Schedule; trying another name");
            }
            Err(e) => return Err(e),
        }
    }
    ctx.metrics.skipped_runs.inc();
    let f = Finding::new(
        "NameTaken",
        format!(
            "{} at {} did not run: objects named {name} and its alternative exist and belong to something else; rename or delete them",
            K::ACTION,
            rfc3339(at)
        ),
    );
    ctx.notifier.warn(s, "Schedule", &f).await;
    Ok(())
}
