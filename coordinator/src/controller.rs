//! Wiring: the metrics endpoint, leader election, the watch caches and one controller per kind.
//! Only the leader runs controllers; a standby serves metrics and waits for the Lease.
//!
//! Every kind is watched once. A run kind's watch feeds its store, its own controller and the
//! Schedule controller; the Schedule controller hears of a run only when its phase changes, not on
//! every progress write. Secrets (key names only) wake the Schedules that reference them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use stowage_common::runtime::{RuntimeError, serve_http, shutdown_signal};

use crate::agents::AgentDirectory;
use crate::conditions::Notifier;
use crate::config::Config;
use crate::context::{Ctx, RunStores};
use crate::inspect;
use crate::leader::{self, Elector, LeaderError};
use crate::metrics::Metrics;
use crate::run;
use crate::runs::{RunObject, is_terminal};
use crate::schedule;
use crate::state::{self, Cache, SyncTimeout};
use stowage_api::{Backup, Check, Prune, Restore, RunPhase, Schedule, Verify};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Leader(#[from] LeaderError),
    #[error(transparent)]
    Sync(#[from] SyncTimeout),
}

/// A run that is not finished is re-examined this often, so none stays Running without a task.
const RUN_RECHECK: Duration = Duration::from_secs(30);
/// Events buffered per subscriber of a shared watch.
const SHARED_BUFFER: usize = 1024;

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A reconcile that waits for the caches first; a cache that does not fill in time is an error
/// (retried), never a decision made on a partial view.
async fn when_synced(ctx: &Ctx) -> Result<(), kube::Error> {
    let started = std::time::Instant::now();
    let r = ctx
        .synced()
        .await
        .map_err(|e| kube::Error::Service(Box::new(e)));
    let waited = started.elapsed();
    if waited > Duration::from_millis(100) {
        tracing::debug!(
            waited_ms = waited.as_millis() as u64,
            "reconcile waited for the caches"
        );
    }
    r
}

/// Starts executing a run unless it is finished or already executing here.
fn reconcile_run<K, F, Fut>(obj: Arc<K>, ctx: Arc<Ctx>, execute: F) -> Action
where
    K: RunObject,
    F: FnOnce(Arc<Ctx>, Arc<K>) -> Fut,
    Fut: Future<Output = Result<(), kube::Error>> + Send + 'static,
{
    if is_terminal(obj.run_status().and_then(|s| s.phase)) {
        return Action::await_change();
    }
    tracing::debug!(kind = K::ACTION, run = %obj.name_any(), "reconciling run");
    let uid = obj.uid().unwrap_or_default();
    if let Some(claim) = ctx.claim(&uid) {
        let name = obj.name_any();
        let work = execute(Arc::clone(&ctx), obj);
        tokio::spawn(async move {
            let _claim = claim;
            if let Err(e) = work.await {
                // The run stays unfinished; the periodic re-check resumes it.
                tracing::warn!(kind = K::ACTION, run = %name, error = %crate::errors::sentence(&e), "run interrupted");
            }
        });
    }
    Action::requeue(RUN_RECHECK)
}

fn error_policy<K>(_obj: Arc<K>, err: &kube::Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %crate::errors::sentence(err), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn drain<S, T, E>(stream: S, kind: &'static str)
where
    S: futures::Stream<Item = Result<T, E>>,
    E: std::fmt::Display,
{
    stream
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(kind, error = %e, "controller");
            }
        })
        .await;
}

/// One shared watch of a run kind: its store, a subscriber for its controller and one for the
/// Schedule controller. The watch runs from the moment it is made.
struct SharedRuns<K: RunObject> {
    store: Store<K>,
    ready: state::Ready,
    for_runs: reflector::ReflectHandle<K>,
    for_schedules: reflector::ReflectHandle<K>,
}

fn shared_runs<K>(client: &Client, ns: Option<&str>) -> Option<SharedRuns<K>>
where
    K: RunObject,
{
    let (store, writer) = reflector::store_shared(SHARED_BUFFER);
    let for_runs = writer.subscribe()?;
    let for_schedules = writer.subscribe()?;
    let (ready_tx, ready) = state::readiness();
    // A shared watch waits for its subscribers to take events, so it is driven from the start.
    tokio::spawn(
        watcher(api::<K>(client, ns), watcher::Config::default())
            .default_backoff()
            .reflect_shared(writer)
            .for_each(move |r| state::observe(K::ACTION, &ready_tx, r)),
    );
    Some(SharedRuns {
        store,
        ready,
        for_runs,
        for_schedules,
    })
}

/// Fires every `period`: each run controller re-examines every run it knows this often, so a run
/// is never left unexamined because an event was missed.
fn every(period: Duration) -> impl Stream<Item = ()> + Send + 'static {
    futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(period).await;
        Some(((), ()))
    })
}

/// Only the events where a run's phase changed (or it appeared): progress writes do not wake the
/// Schedule.
fn phase_changes<K: RunObject>(
    runs: impl Stream<Item = Arc<K>> + Send + 'static,
) -> impl Stream<Item = Arc<K>> + Send + 'static {
    let mut seen: HashMap<String, Option<RunPhase>> = HashMap::new();
    runs.filter(move |r| {
        let phase = r.run_status().and_then(|s| s.phase);
        let changed = seen.insert(r.uid().unwrap_or_default(), phase) != Some(phase);
        futures::future::ready(changed)
    })
}

/// The Schedules of the Secret's namespace whose backend names it.
fn schedules_using(schedules: &Store<Schedule>, secret: &Secret) -> Vec<ObjectRef<Schedule>> {
    let (ns, name) = (secret.namespace(), secret.name_any());
    schedules
        .state()
        .iter()
        .filter(|s| s.namespace() == ns)
        .filter(|s| {
            let b = &s.spec.backend;
            let mut refs = vec![&b.repo_password_secret_ref];
            if let Some(s3) = &b.s3 {
                refs.push(&s3.access_key_id_secret_ref);
                refs.push(&s3.secret_access_key_secret_ref);
            }
            if let Some(r) = &b.rest {
                refs.extend(r.username_secret_ref.iter());
                refs.extend(r.password_secret_ref.iter());
            }
            refs.iter().any(|r| r.name == name)
        })
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}

pub async fn run(config: Config) -> Result<(), CoordinatorError> {
    let metrics = Metrics::new()?;
    serve_http(
        config.metrics_listen,
        metrics.router(),
        std::future::pending::<()>(),
    )
    .await?;
    let kube_config = kube::Config::infer()
        .await
        .map_err(|e| CoordinatorError::Client(kube::Error::InferConfig(e)))?;
    let client = Client::try_from(kube_config.clone()).map_err(CoordinatorError::Client)?;
    metrics.set_ready();

    let identity = config.identity();
    let lease_client = leader::client_for(&kube_config, config.lease_duration)
        .map_err(CoordinatorError::Client)?;
    let elector = Elector::new(
        lease_client,
        &config.lease_namespace,
        &config.lease_name,
        &identity,
        config.lease_duration,
    )
    .await?;
    tracing::info!(identity = %identity, lease = %config.lease_name, "waiting to lead");
    tokio::select! {
        () = elector.acquire() => {}
        () = shutdown_signal() => return Ok(()),
    }
    metrics.leader.set(1);
    // From here on the Lease is renewed in the background, also while the caches fill.
    let leading = async {
        let lost = elector.keep().await;
        metrics.leader.set(0);
        lost
    };
    tokio::select! {
        r = lead(client, config, identity, metrics.clone()) => r,
        lost = leading => Err(lost.into()),
        () = shutdown_signal() => {
            tracing::info!("shutting down: releasing the Lease; unfinished runs resume on the next leader");
            elector.release().await;
            metrics.leader.set(0);
            Ok(())
        }
    }
}

/// The watches of one watched namespace (or of the whole cluster): the caches, and the shared
/// run watches with their subscribers.
struct NamespaceWatches {
    namespace: Option<String>,
    stores: state::Stores,
    secret_events: reflector::ReflectHandle<Secret>,
    backups: SharedRuns<Backup>,
    checks: SharedRuns<Check>,
    prunes: SharedRuns<Prune>,
    restores: SharedRuns<Restore>,
    verifies: SharedRuns<Verify>,
}

/// Starts the watches of `ns`; `None` only if a shared watch cannot be subscribed to, which
/// happens only with a store made without a buffer (never here).
fn watch_namespace(client: &Client, ns: Option<String>) -> Option<NamespaceWatches> {
    let (_, secret_writer) = reflector::store_shared(SHARED_BUFFER);
    let secret_events = secret_writer.subscribe()?;
    let (stores, watches) = state::start(client, ns.as_deref(), secret_writer);
    tokio::spawn(watches);
    let w = NamespaceWatches {
        stores,
        secret_events,
        backups: shared_runs::<Backup>(client, ns.as_deref())?,
        checks: shared_runs::<Check>(client, ns.as_deref())?,
        prunes: shared_runs::<Prune>(client, ns.as_deref())?,
        restores: shared_runs::<Restore>(client, ns.as_deref())?,
        verifies: shared_runs::<Verify>(client, ns.as_deref())?,
        namespace: ns,
    };
    Some(w)
}

/// What the leader does: fill the caches, then run the controllers: one set per watched
/// namespace (a namespaced RBAC binding allows no cluster-wide watch), sharing one context.
async fn lead(
    client: Client,
    config: Config,
    identity: String,
    metrics: Metrics,
) -> Result<(), CoordinatorError> {
    let namespaces: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let (agents, agent_watch) = AgentDirectory::start(client.clone(), &config, metrics.clone())?;
    tokio::spawn(agent_watch);

    let mut watched = Vec::new();
    for ns in &namespaces {
        let Some(w) = watch_namespace(&client, ns.clone()) else {
            tracing::error!("cannot subscribe to the shared watches");
            return Ok(());
        };
        watched.push(w);
    }
    tokio::time::timeout(state::SYNC_TIMEOUT, agents.wait_synced())
        .await
        .map_err(|_| SyncTimeout::after(state::SYNC_TIMEOUT))?;
    // The other caches fill while the controllers run: a shared watch waits for its subscribers to
    // take events, so they must be polled from the start. Reconcilers wait for `Ctx::synced`.

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "stowage-coordinator".into(),
            instance: Some(identity.clone()),
        },
    );
    let runs = RunStores {
        backups: watched.iter().map(|w| w.backups.store.clone()).collect(),
        checks: watched.iter().map(|w| w.checks.store.clone()).collect(),
        prunes: watched.iter().map(|w| w.prunes.store.clone()).collect(),
        restores: watched.iter().map(|w| w.restores.store.clone()).collect(),
        verifies: watched.iter().map(|w| w.verifies.store.clone()).collect(),
        ready: watched
            .iter()
            .flat_map(|w| {
                [
                    w.backups.ready.clone(),
                    w.checks.ready.clone(),
                    w.prunes.ready.clone(),
                    w.restores.ready.clone(),
                    w.verifies.ready.clone(),
                ]
            })
            .collect(),
    };
    let stores = state::Stores::merge(watched.iter().map(|w| w.stores.clone()).collect());
    let ctx = Arc::new(Ctx::new(
        client.clone(),
        stores,
        runs,
        config,
        agents,
        Notifier::new(recorder),
        metrics.clone(),
    ));
    let wc = watcher::Config::default;

    let schedule_controllers: Vec<Controller<Schedule>> = namespaces
        .iter()
        .map(|ns| Controller::new(api::<Schedule>(&client, ns.as_deref()), wc()))
        .collect();
    let all_schedules: Cache<Schedule> = schedule_controllers.iter().map(|c| c.store()).collect();
    let _ = ctx.schedules.set(all_schedules.clone());
    tokio::spawn(sweep_schedule_metrics(
        all_schedules.clone(),
        metrics.clone(),
    ));
    // The inspector reads repository figures between runs and asks for the Schedule's reconcile
    // to write them, so the Schedule's status keeps one writer: its namespace's controller.
    let (nudge, mut nudged) = tokio::sync::mpsc::channel::<ObjectRef<Schedule>>(64);
    tokio::spawn(inspect::run(Arc::clone(&ctx), all_schedules, nudge));
    let mut nudges = HashMap::new();
    let mut controllers: Vec<futures::future::BoxFuture<'static, ()>> = Vec::new();
    for (w, schedules) in watched.into_iter().zip(schedule_controllers) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        nudges.insert(w.namespace.clone(), tx);
        let schedule_store = schedules.store();
        let schedules = schedules
            .reconcile_on(tokio_stream::wrappers::ReceiverStream::new(rx))
            .owns_shared_stream(phase_changes(w.backups.for_schedules))
            .owns_shared_stream(phase_changes(w.checks.for_schedules))
            .owns_shared_stream(phase_changes(w.prunes.for_schedules))
            .owns_shared_stream(phase_changes(w.verifies.for_schedules))
            .watches_shared_stream(w.secret_events, move |secret: Arc<Secret>| {
                schedules_using(&schedule_store, &secret)
            })
            .run(
                |s, c| async move {
                    when_synced(&c).await?;
                    schedule::reconcile(s, c).await
                },
                error_policy,
                Arc::clone(&ctx),
            );
        // Restores are not a Schedule's: nobody else subscribes to their watch.
        drop(w.restores.for_schedules);
        controllers.push(drain(schedules, "schedule").boxed());
        controllers.extend([
            run_controller(
                w.backups.for_runs,
                w.backups.store,
                &ctx,
                run::backup::execute,
            ),
            run_controller(
                w.checks.for_runs,
                w.checks.store,
                &ctx,
                run::maintenance::execute_check,
            ),
            run_controller(
                w.prunes.for_runs,
                w.prunes.store,
                &ctx,
                run::maintenance::execute_prune,
            ),
            run_controller(
                w.restores.for_runs,
                w.restores.store,
                &ctx,
                run::restore::execute,
            ),
            run_controller(
                w.verifies.for_runs,
                w.verifies.store,
                &ctx,
                run::verify::execute,
            ),
        ]);
    }
    // Each nudge goes to the controller of the Schedule's namespace (the only one, when the whole
    // cluster is watched).
    tokio::spawn(async move {
        while let Some(r) = nudged.recv().await {
            let target = nudges
                .get(&r.namespace)
                .or_else(|| nudges.get(&None))
                .cloned();
            if let Some(tx) = target {
                let _ = tx.try_send(r);
            }
        }
    });
    tracing::info!(
        namespaces = %if namespaces == [None] { "(all)".to_string() } else { namespaces.iter().flatten().cloned().collect::<Vec<_>>().join(",") },
        "controllers running"
    );
    futures::future::join_all(controllers).await;
    Ok(())
}

/// The controller of one run kind in one namespace, to be driven: started by each change of a
/// run, and every `RUN_RECHECK` for every run it knows.
fn run_controller<K, F, Fut>(
    events: reflector::ReflectHandle<K>,
    store: Store<K>,
    ctx: &Arc<Ctx>,
    execute: F,
) -> futures::future::BoxFuture<'static, ()>
where
    K: RunObject,
    F: FnOnce(Arc<Ctx>, Arc<K>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Result<(), kube::Error>> + Send + 'static,
{
    let controller = Controller::for_shared_stream(events, store)
        .reconcile_all_on(every(RUN_RECHECK))
        .run(
            move |o, c| async move {
                when_synced(&c).await?;
                Ok::<_, kube::Error>(reconcile_run(o, c, execute))
            },
            error_policy,
            Arc::clone(ctx),
        );
    drain(controller, K::ACTION).boxed()
}

/// Deleted Schedules get no reconcile (there is nothing left to reconcile), so their metric series
/// are swept against the Schedules the cache holds.
async fn sweep_schedule_metrics(schedules: Cache<Schedule>, metrics: Metrics) {
    loop {
        tokio::time::sleep(Duration::from_secs(15)).await;
        let live = schedules
            .state()
            .iter()
            .map(|s| (s.namespace().unwrap_or_default(), s.name_any()))
            .collect();
        metrics.forget_schedules_except(&live);
    }
}
