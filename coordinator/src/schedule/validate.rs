//! What is wrong with a Schedule's spec, each finding naming its field.

use std::collections::BTreeMap;

use kube::ResourceExt;

use super::{ACTIONS, expression};
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::cron::CronSchedule;
use crate::plan::selector_matches;
use crate::restic_fields;
use stowage_api::{Retention, Schedule};
use stowage_common::backend::{self, Secrets};

/// Everything wrong with the spec, each naming its field.
pub(super) async fn validate(
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
    if s.spec.backup.is_none()
        && s.spec.check.is_none()
        && s.spec.prune.is_none()
        && s.spec.verify.is_none()
    {
        problems.push(Finding::new(
            "NothingScheduled",
            "spec: set at least one of backup, check, prune, verify",
        ));
    }
    if let Some(v) = &s.spec.verify {
        if let Some(b) = v.sample_bytes.as_deref()
            && let Err(f) = restic_fields::sample_bytes(b, "spec.verify.sampleBytes")
        {
            problems.push(f);
        }
        if let Err(e) = selector_matches(v.selector.as_ref(), &BTreeMap::new()) {
            problems.push(Finding::new(
                "InvalidSelector",
                format!("spec.verify.{}: {}", e.field, e.reason),
            ));
        }
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
    let secrets = Secrets::Cache(ctx.stores.secrets.stores(), ctx.client.clone());
    let allowed = &ctx.config.allowed_endpoint;
    let backend_ok =
        match backend::resolve(&secrets, allowed, &ns, &s.spec.backend, "spec.backend").await {
            Ok(_) => true,
            Err(f) => {
                problems.push(f);
                false
            }
        };
    // Maintenance credentials: resolvable (the same rules: labelled Secrets, allowed endpoints),
    // and a place to use them, if the Schedule prunes.
    match backend::maintenance_spec(&s.spec.backend, "spec.backend") {
        Err(f) => problems.push(f),
        Ok(None) => {}
        Ok(Some(m)) => {
            if let Err(f) =
                backend::resolve(&secrets, allowed, &ns, &m, "spec.backend.maintenance").await
            {
                problems.push(f);
            }
            if s.spec.prune.is_some() && ctx.agents.maintenance_endpoint().is_none() {
                problems.push(Finding::new(
                    crate::run::maintenance::NO_MAINTENANCE_CONTAINER,
                    "spec.backend.maintenance: its Prunes would fail: these credentials never go to a node agent and this coordinator has no maintenance container (--maintenance-agent; chart value coordinator.maintenance.enabled)",
                ));
            }
        }
    }
    let mut selection = None;
    if let Some(b) = &s.spec.backup {
        let sel = b.selector.as_ref();
        match selector_matches(sel, &BTreeMap::new()) {
            Err(e) => problems.push(Finding::new(
                "InvalidSelector",
                format!("spec.backup.{}: {}", e.field, e.reason),
            )),
            Ok(_) => {
                let any = ctx
                    .stores
                    .pvcs
                    .in_namespace(&ns)
                    .iter()
                    .any(|p| selector_matches(sel, &p.labels).unwrap_or(false));
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
    (problems, backend_ok, selection)
}
