//! Verify runs: for each volume and backup command in scope (chosen as a Backup chooses them), the
//! agent of a node restores the newest complete snapshot into scratch space with
//! `restic restore --verify` (or hashes a command's dump) and reports what came back. Drills are
//! spread over the ready agents, one at a time per node; on each node they rank below backups.
//!
//! With `sampleBytes`, each drill of a volume reads a window of its snapshot's files that starts
//! after the last file of the newest earlier drill of that volume in the namespace, so successive
//! runs cover different files; the item records the window (`verification.first`/`last`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::Utc;
use kube::ResourceExt;
use stowage_proto::v1::{self as pb, VerifyRequest, verify_request};

use super::backup::select::{Work, select};
use super::backup::{MAX_RUN_ITEMS, TOO_MANY_ITEMS};
use super::status::StatusHandle;
use super::{Begun, Origin, begin, run_id};
use crate::conditions::Finding;
use crate::context::Ctx;
use crate::dispatch;
use crate::errors;
use crate::restic_fields;
use crate::run::maintenance::{NO_AGENT, human_bytes};
use crate::runs::{RunObject, is_terminal, phase_of};
use stowage_api::{ItemStatus, RunPhase, Verification, Verify};

/// An item's reason when its identity has no complete snapshot to drill.
pub const NO_SNAPSHOT: &str = "NoSnapshot";

/// The longest sample path kept in a status (a tenant names its files; the cursor still works
/// when cut, at worst re-reading one file).
const SAMPLE_PATH_MAX: usize = 512;

/// One drill to run: the item as the run reports it, and whose snapshot.
struct Drill {
    item: ItemStatus,
    source: verify_request::Source,
}

impl Drill {
    fn of(work: &Work) -> Option<Drill> {
        match work {
            Work::Volume { namespace, pvc, .. } => Some(Drill {
                item: work.item(),
                source: verify_request::Source::Volume(pb::VolumeIdentity {
                    namespace: namespace.clone(),
                    pvc: pvc.clone(),
                    pod_name: String::new(),
                }),
            }),
            Work::Command(job, _) => {
                let mut item = work.item();
                // Where the command runs does not matter to its history.
                item.pod = None;
                item.node = None;
                Some(Drill {
                    item,
                    source: verify_request::Source::Command(pb::CommandIdentity {
                        namespace: job.namespace.clone(),
                        owner_kind: job.owner_kind.clone(),
                        owner_name: job.owner_name.clone(),
                        container: job.container.clone(),
                    }),
                })
            }
            // A command that cannot run now still has a history, but no identity to name it by.
            Work::Fail(_) => None,
        }
    }

    fn key(&self) -> (String, String) {
        (self.item.namespace.clone(), self.item.name())
    }
}

/// The last file each identity's newest earlier drill read, from the Verify runs of `namespace`.
fn cursors(ctx: &Ctx, namespace: &str, this: &Verify) -> HashMap<String, String> {
    let mut newest: HashMap<String, (String, String)> = HashMap::new();
    for v in Verify::store(&ctx.runs).state() {
        if v.namespace().as_deref() != Some(namespace) || v.uid() == this.uid() {
            continue;
        }
        let Some(st) = v.status.as_ref() else {
            continue;
        };
        let done = st.completion_time.clone().unwrap_or_default();
        for i in st.items.iter().filter(|i| i.phase == RunPhase::Succeeded) {
            let Some(last) = i.verification.as_ref().and_then(|v| v.last.clone()) else {
                continue;
            };
            let slot = newest.entry(i.name()).or_default();
            if done > slot.0 {
                *slot = (done.clone(), last);
            }
        }
    }
    newest.into_iter().map(|(k, (_, last))| (k, last)).collect()
}

fn cut(path: String) -> String {
    if path.len() <= SAMPLE_PATH_MAX {
        return path;
    }
    let mut end = SAMPLE_PATH_MAX;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path[..end].to_string()
}

fn verification(r: &pb::VerifyResult) -> Verification {
    let s = r.sample.clone().unwrap_or_default();
    let non_empty = |p: String| (!p.is_empty()).then(|| cut(p));
    Verification {
        snapshot_time: (!r.snapshot_time.is_empty()).then(|| r.snapshot_time.clone()),
        files: r.files,
        bytes: r.bytes,
        complete: s.complete,
        first: non_empty(s.first),
        last: non_empty(s.last),
        wrapped: s.wrapped,
        snapshot_files: Some(s.snapshot_files),
        skipped_files: (s.skipped_files > 0).then_some(s.skipped_files),
        sha256: (!r.sha256.is_empty()).then(|| r.sha256.clone()),
        yielded: (r.yielded > 0).then_some(r.yielded),
    }
}

/// Runs the drills assigned to one node, one after the other.
async fn drill_on(
    ctx: Arc<Ctx>,
    node: String,
    drills: Vec<(Drill, VerifyRequest)>,
    status: StatusHandle,
) -> Vec<ItemStatus> {
    let mut out = Vec::new();
    for (drill, req) in drills {
        let key = drill.key();
        let mut item = drill.item;
        item.node = Some(node.clone());
        item.phase = RunPhase::Running;
        status.item(item.clone());
        let started = std::time::Instant::now();
        let progress = |p: &pb::Progress| {
            if p.phase == pb::Phase::Queued as i32 {
                status.waiting(key.clone(), Some(errors::bounded(&p.message, 256)));
            } else {
                status.waiting(key.clone(), None);
                // restic's fraction; the status writer shows it in percent.
                if p.percent_done > 0.0 {
                    status.progress(key.clone(), p.percent_done);
                }
            }
        };
        let r = dispatch::verify(&ctx.agents, &node, req, progress).await;
        item.message = None;
        item.percent_done = None;
        item.duration_seconds = Some(started.elapsed().as_secs_f64());
        match r {
            Ok(r) => {
                item.phase = RunPhase::Succeeded;
                item.snapshot_id = Some(r.snapshot_id.clone());
                item.verification = Some(verification(&r));
            }
            // Nothing to drill yet (a new or empty volume, before its first snapshot): not a
            // failed verification; a volume that is never backed up is the backup alert's.
            Err(dispatch::DispatchError::Agent {
                code: tonic::Code::NotFound,
                message,
                ..
            }) => {
                item.phase = RunPhase::Skipped;
                item.reason = Some(NO_SNAPSHOT.into());
                item.message = Some(errors::bounded(&message, errors::ITEM_ERROR_MAX));
            }
            Err(e) => {
                item.phase = RunPhase::Failed;
                item.error = Some(errors::bounded(&e.to_string(), errors::ITEM_ERROR_MAX));
            }
        }
        status.item(item.clone());
        out.push(item);
    }
    out
}

pub async fn execute(ctx: Arc<Ctx>, run: Arc<Verify>) -> Result<(), kube::Error> {
    let Some(begun) = begin(ctx.as_ref(), run.as_ref()).await? else {
        return Ok(());
    };
    let namespace = run.namespace().unwrap_or_default();
    let (sample_field, selector_field) = match &begun.origin {
        Origin::Own => ("spec.sampleBytes".to_string(), "spec.selector".to_string()),
        Origin::Schedule(s) => (
            format!("Schedule {s}: spec.verify.sampleBytes"),
            format!("Schedule {s}: spec.verify.selector (or spec.backup.selector)"),
        ),
    };
    let sample_bytes = match begun.spec.sample_bytes.as_deref() {
        None => 0,
        Some(v) => match restic_fields::sample_bytes(v, &sample_field) {
            Ok(b) => b,
            Err(f) => return fail(&ctx, &run, begun, &f).await,
        },
    };
    let id = run_id(run.as_ref());
    let works = match select(
        &ctx,
        &id,
        &namespace,
        begun.spec.selector.as_ref(),
        &selector_field,
    ) {
        Ok(w) => w,
        Err(f) => return fail(&ctx, &run, begun, &f).await,
    };
    let mut drills: BTreeMap<(String, String), Drill> = BTreeMap::new();
    for d in works.iter().filter_map(Drill::of) {
        drills.entry(d.key()).or_insert(d);
    }
    if drills.len() > MAX_RUN_ITEMS {
        let f = Finding::new(
            TOO_MANY_ITEMS,
            format!(
                "{selector_field}: the run would drill {} volumes and commands, and a run holds at most {MAX_RUN_ITEMS} (its status must fit in one object); split namespace {namespace} between Schedules with selectors",
                drills.len()
            ),
        );
        return fail(&ctx, &run, begun, &f).await;
    }
    let nodes = ctx.agents.ready_nodes();
    if nodes.is_empty() {
        let f = Finding::new(
            NO_AGENT,
            format!(
                "no ready Stowage agent (pods in namespace {} with labels {})",
                ctx.config.agent_namespace, ctx.config.agent_selector
            ),
        );
        return fail(&ctx, &run, begun, &f).await;
    }
    // A resumed run keeps what its earlier attempt finished.
    let finished: HashMap<(String, String), ItemStatus> = begun
        .before
        .items
        .iter()
        .filter(|i| is_terminal(Some(i.phase)))
        .map(|i| ((i.namespace.clone(), i.name()), i.clone()))
        .collect();
    let cursors = cursors(&ctx, &namespace, &run);
    let mut by_node: BTreeMap<String, Vec<(Drill, VerifyRequest)>> = BTreeMap::new();
    let mut done = Vec::new();
    let mut next = 0usize;
    for (key, drill) in drills {
        if let Some(item) = finished.get(&key) {
            done.push(item.clone());
            continue;
        }
        // Spread over the ready agents, in turn.
        let node = nodes[next % nodes.len()].clone();
        next += 1;
        let is_volume = matches!(drill.source, verify_request::Source::Volume(_));
        let req = VerifyRequest {
            run_id: id.clone(),
            repository: Some(begun.repository.clone()),
            source: Some(drill.source.clone()),
            sample_bytes: if is_volume { sample_bytes } else { 0 },
            sample_after: cursors.get(&key.1).cloned().unwrap_or_default(),
            namespace: namespace.clone(),
        };
        begun.status.item(drill.item.clone());
        by_node.entry(node).or_default().push((drill, req));
    }
    let tasks = by_node.into_iter().map(|(node, drills)| {
        tokio::spawn(drill_on(
            Arc::clone(&ctx),
            node,
            drills,
            begun.status.clone(),
        ))
    });
    let mut items = done;
    for t in futures::future::join_all(tasks).await {
        match t {
            Ok(mut v) => items.append(&mut v),
            Err(e) => tracing::error!(error = %e, "a drill task ended abnormally"),
        }
    }
    items.sort_by_key(|i| (i.namespace.clone(), i.name()));
    conclude(&ctx, &run, begun, &items).await;
    Ok(())
}

async fn fail(
    ctx: &Arc<Ctx>,
    run: &Arc<Verify>,
    begun: Begun,
    f: &Finding,
) -> Result<(), kube::Error> {
    ctx.metrics.verify_runs.with_label_values(&["failed"]).inc();
    begun
        .finish(ctx.as_ref(), run.as_ref(), RunPhase::Failed, f)
        .await;
    Ok(())
}

/// The run's phase, condition, Event and metrics from its items.
async fn conclude(ctx: &Arc<Ctx>, run: &Arc<Verify>, begun: Begun, items: &[ItemStatus]) {
    let phase = phase_of(items);
    let ok: Vec<&ItemStatus> = items
        .iter()
        .filter(|i| i.phase == RunPhase::Succeeded)
        .collect();
    let (files, bytes) = ok
        .iter()
        .filter_map(|i| i.verification.as_ref())
        .fold((0, 0), |(f, b), v| (f + v.files, b + v.bytes));
    let now = Utc::now().timestamp() as f64;
    for i in &ok {
        match &i.command {
            None => ctx.metrics.verified(&i.namespace, &i.pvc, None, now),
            Some(c) => ctx
                .metrics
                .verified(&i.namespace, &c.owner, Some(&c.container), now),
        }
    }
    ctx.metrics.verify_bytes.inc_by(bytes);
    ctx.metrics
        .verify_runs
        .with_label_values(&[crate::runs::phase_label(phase)])
        .inc();
    let skipped = items
        .iter()
        .filter(|i| i.phase == RunPhase::Skipped)
        .count();
    let not_yet = if skipped > 0 {
        format!(" ({skipped} without a complete snapshot yet: nothing to drill)")
    } else {
        String::new()
    };
    let finding = if phase == RunPhase::Succeeded {
        Finding::new(
            "Verified",
            format!(
                "{} of {} verified: {files} file(s), {} read back and checked{not_yet}",
                ok.len(),
                items.len(),
                human_bytes(bytes)
            ),
        )
    } else {
        let failed: Vec<String> = items
            .iter()
            .filter(|i| i.phase != RunPhase::Succeeded)
            .map(|i| {
                format!(
                    "{}: {}",
                    i.name(),
                    i.error.as_deref().unwrap_or("not verified")
                )
            })
            .collect();
        Finding::new(
            "VerifyFailed",
            format!(
                "{} of {} failed verification; {}",
                failed.len(),
                items.len(),
                failed.join("; ")
            ),
        )
    };
    begun
        .finish(ctx.as_ref(), run.as_ref(), phase, &finding)
        .await;
}
