//! Keeps each Schedule's repository gauges current without a run of its own:
//! - its **locks** (`stowage_repository_locks`, `stowage_repository_oldest_lock_age_seconds`) at
//!   the end of every run of the Schedule, and every `--lock-refresh-interval` while one of its runs
//!   waits for a lock;
//! - its **figures** (snapshots, bytes) when no Check, Prune or earlier look refreshed them for
//!   `--figures-interval`. They go into the Schedule's status through its own reconcile, which this
//!   module nudges, so the Schedule's status keeps a single writer.
//!
//! One task for locks and one for figures, each running up to [`LOOKS_AT_ONCE`] looks at a time,
//! so a repository whose endpoint never answers (a tarpit) holds one look, not the others. Each
//! look is bounded in total, whichever agents it tries: any ready agent reads the repository (they
//! all can).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use stowage_proto::v1::InspectResponse;
use tokio::sync::mpsc;

use crate::context::Ctx;
use crate::dispatch::{self, DispatchError};
use crate::errors;
use crate::inspections::Key;
use crate::metrics::Metrics;
use crate::runs::{RunObject, now_rfc3339};
use stowage_api::{RepositoryFigures, RunPhase, RunStatus, Schedule};
use stowage_common::backend::{self, Secrets};

/// How long one look may take: listing and reading locks is a few restic runs; figures load the
/// index (and may wait up to a minute for a prune's exclusive lock).
const LOCKS_WITHIN: Duration = Duration::from_secs(120);
const FIGURES_WITHIN: Duration = Duration::from_secs(600);
/// Looks of one kind running at once.
const LOOKS_AT_ONCE: usize = 4;

/// Whether the run waits for a repository lock now: the agents' "waiting for the repository lock
/// held by ..." is the only message a running run or item carries.
fn waits_for_lock(st: &RunStatus) -> bool {
    st.phase == Some(RunPhase::Running)
        && (st.message.is_some()
            || st
                .items
                .iter()
                .any(|i| i.phase == RunPhase::Running && i.message.is_some()))
}

/// Schedules with a run waiting for a lock now, from the run caches.
fn waiting(ctx: &Ctx) -> BTreeSet<Key> {
    fn of<K: RunObject>(ctx: &Ctx, out: &mut BTreeSet<Key>) {
        for r in K::store(&ctx.runs).state() {
            if let (Some(st), Some(s)) = (r.run_status(), r.schedule_ref())
                && waits_for_lock(st)
            {
                out.insert((r.namespace().unwrap_or_default(), s.name.clone()));
            }
        }
    }
    let mut out = BTreeSet::new();
    of::<stowage_api::Backup>(ctx, &mut out);
    of::<stowage_api::Check>(ctx, &mut out);
    of::<stowage_api::Prune>(ctx, &mut out);
    out
}

/// Sets the lock gauges from one look.
pub fn publish_locks(metrics: &Metrics, namespace: &str, schedule: &str, r: &InspectResponse) {
    let exclusive = r.locks.iter().filter(|l| l.exclusive).count();
    let shared = r.locks.len() - exclusive;
    for (kind, n) in [
        ("true", exclusive as i64),
        ("false", shared as i64),
        ("unknown", i64::from(r.unread_locks)),
    ] {
        metrics
            .repository_locks
            .with_label_values(&[namespace, schedule, kind])
            .set(n);
    }
    let oldest = r.locks.iter().map(|l| l.age_seconds).fold(0.0, f64::max);
    metrics
        .oldest_lock_age
        .with_label_values(&[namespace, schedule])
        .set(oldest);
    metrics.schedule_seen(namespace, schedule);
}

/// When the Schedule's figures were last read, by any means (RFC 3339).
fn figures_time(ctx: &Ctx, s: &Schedule, key: &Key) -> Option<String> {
    let status = s
        .status
        .as_ref()
        .and_then(|st| st.repository.as_ref())
        .and_then(|f| f.time.clone());
    let mine = ctx.inspector.figures(&key.0, &key.1).and_then(|f| f.time);
    status.max(mine)
}

fn older_than(time: Option<&str>, age: Duration) -> bool {
    let Some(t) = time.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) else {
        return true;
    };
    chrono::Utc::now() - t.to_utc() > chrono::Duration::from_std(age).unwrap_or_default()
}

/// The tasks: one for locks (woken when a run ends, and every `--lock-refresh-interval`), one for
/// figures (whose looks may wait for a prune's lock, so they never delay a lock look). Schedules
/// whose figures changed go to `nudge`, the Schedule controller's extra trigger.
pub async fn run(
    ctx: Arc<Ctx>,
    schedules: crate::state::Cache<Schedule>,
    nudge: mpsc::Sender<ObjectRef<Schedule>>,
) {
    tokio::join!(
        lock_looks(Arc::clone(&ctx), schedules.clone()),
        figure_looks(ctx, schedules, nudge)
    );
}

async fn lock_looks(ctx: Arc<Ctx>, schedules: crate::state::Cache<Schedule>) {
    let every = ctx.config.lock_refresh_interval.max(Duration::from_secs(1));
    // When each Schedule was last looked at while waiting, so a waiting run costs one look per
    // interval however often runs end.
    let mut looked: HashMap<Key, Instant> = HashMap::new();
    let in_flight = InFlight::default();
    loop {
        tokio::select! {
            () = ctx.inspector.woken() => {}
            () = tokio::time::sleep(every) => {}
        }
        if ctx.synced().await.is_err() {
            continue;
        }
        let mut due = ctx.inspector.take_pending();
        for key in waiting(&ctx) {
            if looked.get(&key).is_none_or(|t| t.elapsed() >= every) {
                due.insert(key);
            }
        }
        forget_gone(&mut looked, &schedules);
        for key in due {
            let Some(s) = schedules.get(&ObjectRef::new(&key.1).within(&key.0)) else {
                continue;
            };
            let Some(guard) = in_flight.start(&key) else {
                continue;
            };
            looked.insert(key.clone(), Instant::now());
            let ctx = Arc::clone(&ctx);
            tokio::spawn(async move {
                let _guard = guard;
                match look(&ctx, &s, false).await {
                    Ok(r) => publish_locks(&ctx.metrics, &key.0, &key.1, &r),
                    Err(e) => {
                        tracing::info!(namespace = %key.0, schedule = %key.1, error = %e, "could not read the repository's locks; trying again later");
                    }
                }
            });
        }
    }
}

fn key_of(s: &Schedule) -> Key {
    (s.namespace().unwrap_or_default(), s.name_any())
}

/// Drops the entries of Schedules that no longer exist, so the maps stay as large as the cache.
fn forget_gone(seen: &mut HashMap<Key, Instant>, schedules: &crate::state::Cache<Schedule>) {
    let live: HashSet<Key> = schedules.state().iter().map(|s| key_of(s)).collect();
    seen.retain(|k, _| live.contains(k));
}

async fn figure_looks(
    ctx: Arc<Ctx>,
    schedules: crate::state::Cache<Schedule>,
    nudge: mpsc::Sender<ObjectRef<Schedule>>,
) {
    let every = ctx.config.figures_interval.max(Duration::from_secs(1));
    // A failed look (no repository yet, a prune holding the lock) is retried an interval later.
    let mut tried: HashMap<Key, Instant> = HashMap::new();
    let in_flight = InFlight::default();
    loop {
        tokio::time::sleep(every.min(Duration::from_secs(60))).await;
        if ctx.synced().await.is_err() {
            continue;
        }
        forget_gone(&mut tried, &schedules);
        for s in schedules.state() {
            let key = key_of(&s);
            if s.spec.paused
                || tried.get(&key).is_some_and(|t| t.elapsed() < every)
                || !older_than(figures_time(&ctx, &s, &key).as_deref(), every)
            {
                continue;
            }
            let Some(guard) = in_flight.start(&key) else {
                continue;
            };
            tried.insert(key.clone(), Instant::now());
            let (ctx, nudge) = (Arc::clone(&ctx), nudge.clone());
            tokio::spawn(async move {
                let _guard = guard;
                match look(&ctx, &s, true).await {
                    Ok(r) => {
                        publish_locks(&ctx.metrics, &key.0, &key.1, &r);
                        if let Some(f) = r.figures {
                            ctx.inspector.found(
                                key.clone(),
                                RepositoryFigures {
                                    snapshots: f.snapshots,
                                    size_bytes: f.size_bytes,
                                    key_created: (!f.key_created.is_empty())
                                        .then_some(f.key_created),
                                    time: Some(now_rfc3339()),
                                },
                            );
                            let _ = nudge.try_send(ObjectRef::from_obj(s.as_ref()));
                        }
                    }
                    Err(e) => {
                        tracing::info!(namespace = %key.0, schedule = %key.1, error = %e, "could not read the repository's figures; trying again later");
                    }
                }
            });
        }
    }
}

/// The Schedules with a look of one kind running: at most one per Schedule, and at most
/// [`LOOKS_AT_ONCE`] in all (a Schedule over the cap waits for the next turn).
#[derive(Default, Clone)]
struct InFlight(Arc<Mutex<HashSet<Key>>>);

/// A running look's place; freed on drop (the look ended, or its task was dropped).
struct Looking(InFlight, Key);

impl InFlight {
    fn start(&self, key: &Key) -> Option<Looking> {
        let mut set = self.0.lock().ok()?;
        if set.len() >= LOOKS_AT_ONCE || !set.insert(key.clone()) {
            return None;
        }
        Some(Looking(self.clone(), key.clone()))
    }
}

impl Drop for Looking {
    fn drop(&mut self) {
        if let Ok(mut set) = (self.0).0.lock() {
            set.remove(&self.1);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum LookError {
    #[error("{0}")]
    Backend(String),
    #[error("no ready agent")]
    NoAgent,
    #[error("no agent could read the repository within {}s", .0.as_secs())]
    TimedOut(Duration),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
}

/// One look at the Schedule's repository, by the first ready agent that answers.
async fn look(ctx: &Ctx, s: &Schedule, figures: bool) -> Result<InspectResponse, LookError> {
    let namespace = s.namespace().unwrap_or_default();
    let repository = backend::resolve(
        &Secrets::Api(ctx.client.clone()),
        &ctx.config.allowed_endpoint,
        &namespace,
        &s.spec.backend,
        "spec.backend",
    )
    .await
    .map_err(|f| LookError::Backend(errors::bounded(&f.message, 512)))?;
    let within = if figures {
        FIGURES_WITHIN
    } else {
        LOCKS_WITHIN
    };
    // `within` bounds the whole look, however many agents it tries: a repository endpoint that
    // never answers makes every agent wait alike.
    let deadline = tokio::time::Instant::now() + within;
    let mut last = LookError::NoAgent;
    for node in ctx.agents.ready_nodes() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(LookError::TimedOut(within));
        }
        match dispatch::inspect(&ctx.agents, &node, &repository, figures, left).await {
            Ok(r) => return Ok(r),
            Err(e) if e.try_elsewhere() => last = e.into(),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stowage_api::ItemStatus;
    use stowage_proto::v1::RepositoryLock;

    #[test]
    fn a_run_waits_for_a_lock_only_while_running_with_a_message() {
        let mut st = RunStatus {
            phase: Some(RunPhase::Running),
            ..Default::default()
        };
        assert!(!waits_for_lock(&st));
        st.items.push(ItemStatus {
            phase: RunPhase::Running,
            message: Some("waiting for the repository lock held by x".into()),
            ..Default::default()
        });
        assert!(waits_for_lock(&st));
        st.phase = Some(RunPhase::Succeeded);
        assert!(!waits_for_lock(&st));
        let check = RunStatus {
            phase: Some(RunPhase::Running),
            message: Some("waiting for the repository lock held by y".into()),
            ..Default::default()
        };
        assert!(waits_for_lock(&check));
    }

    #[test]
    fn lock_gauges_count_by_kind_and_take_the_oldest() {
        let m = Metrics::new().unwrap();
        let lock = |exclusive, age_seconds| RepositoryLock {
            exclusive,
            age_seconds,
            ..Default::default()
        };
        let r = InspectResponse {
            locks: vec![lock(true, 40.0), lock(false, 2000.0), lock(false, 1.0)],
            unread_locks: 1,
            figures: None,
        };
        publish_locks(&m, "shop", "nightly", &r);
        let get = |k: &str| {
            m.repository_locks
                .with_label_values(&["shop", "nightly", k])
                .get()
        };
        assert_eq!((get("true"), get("false"), get("unknown")), (1, 2, 1));
        assert_eq!(
            m.oldest_lock_age
                .with_label_values(&["shop", "nightly"])
                .get(),
            2000.0
        );
        publish_locks(&m, "shop", "nightly", &InspectResponse::default());
        assert_eq!((get("true"), get("false"), get("unknown")), (0, 0, 0));
        assert_eq!(
            m.oldest_lock_age
                .with_label_values(&["shop", "nightly"])
                .get(),
            0.0
        );
    }

    #[test]
    fn figures_are_due_when_missing_or_older_than_the_interval() {
        let hour = Duration::from_secs(3600);
        assert!(older_than(None, hour));
        assert!(older_than(Some("2020-01-01T00:00:00Z"), hour));
        assert!(!older_than(Some(&now_rfc3339()), hour));
        assert!(older_than(Some("not a time"), hour));
    }
}
