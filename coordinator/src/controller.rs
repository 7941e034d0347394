//! Wiring: metrics endpoint, leader election, the agent directory and one controller per kind.
//! Only the leader runs controllers; a standby serves metrics and waits for the Lease.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio::net::TcpListener;

use crate::agents::{AgentDirectory, TlsError};
use crate::conditions::Notifier;
use crate::config::Config;
use crate::context::Ctx;
use crate::crd::{Backup, Check, Prune, Schedule};
use crate::leader::{LeaderElector, LeaderError};
use crate::metrics::Metrics;
use crate::run;
use crate::runs::{RunObject, is_terminal};
use crate::schedule;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Leader(#[from] LeaderError),
}

/// A run that is not finished is re-examined this often, so none stays Running without a task.
const RUN_RECHECK: Duration = Duration::from_secs(30);

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
    let uid = obj.uid().unwrap_or_default();
    if let Some(claim) = ctx.claim(&uid) {
        let name = obj.name_any();
        let work = execute(Arc::clone(&ctx), obj);
        tokio::spawn(async move {
            let _claim = claim;
            if let Err(e) = work.await {
                // The run stays unfinished; the periodic re-check resumes it.
                tracing::warn!(kind = K::ACTION, run = %name, error = %e, "run interrupted");
            }
        });
    }
    Action::requeue(RUN_RECHECK)
}

fn error_policy<K>(_obj: Arc<K>, err: &kube::Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %err, "reconcile failed; retrying");
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

pub async fn run(config: Config) -> Result<(), CoordinatorError> {
    let metrics = Metrics::new()?;
    let listener = TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: config.metrics_listen,
            source,
        })?;
    let router = metrics.router();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    let client = Client::try_default()
        .await
        .map_err(CoordinatorError::Client)?;
    metrics.set_ready();

    let identity = config.identity();
    let elector = LeaderElector::new(
        client.clone(),
        &config.lease_namespace,
        &config.lease_name,
        &identity,
        config.lease_duration,
    );
    tracing::info!(identity = %identity, lease = %config.lease_name, "waiting to lead");
    tokio::select! {
        () = elector.acquire() => {}
        () = shutdown_signal() => return Ok(()),
    }
    metrics.leader.set(1);
    let (leading_tx, _leading_rx) = tokio::sync::watch::channel(true);

    let (agents, agent_watch) = AgentDirectory::start(client.clone(), &config, metrics.clone())?;
    tokio::spawn(agent_watch);
    agents.wait_synced().await;

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "stowage-coordinator".into(),
            instance: Some(identity.clone()),
        },
    );
    let ns = config.namespace.clone();
    let ctx = Arc::new(Ctx::new(
        client.clone(),
        config,
        agents,
        Notifier::new(recorder),
        metrics.clone(),
    ));
    let ns = ns.as_deref();
    let wc = watcher::Config::default;

    tokio::spawn(sweep_schedule_metrics(
        api::<Schedule>(&client, ns),
        metrics.clone(),
    ));
    let schedules = Controller::new(api::<Schedule>(&client, ns), wc())
        .owns(api::<Backup>(&client, ns), wc())
        .owns(api::<Check>(&client, ns), wc())
        .owns(api::<Prune>(&client, ns), wc())
        .run(schedule::reconcile, error_policy, Arc::clone(&ctx));
    let backups = Controller::new(api::<Backup>(&client, ns), wc()).run(
        |o, c| async move { Ok::<_, kube::Error>(reconcile_run(o, c, run::backup::execute)) },
        error_policy,
        Arc::clone(&ctx),
    );
    let checks =
        Controller::new(api::<Check>(&client, ns), wc()).run(
            |o, c| async move {
                Ok::<_, kube::Error>(reconcile_run(o, c, run::maintenance::execute_check))
            },
            error_policy,
            Arc::clone(&ctx),
        );
    let prunes =
        Controller::new(api::<Prune>(&client, ns), wc()).run(
            |o, c| async move {
                Ok::<_, kube::Error>(reconcile_run(o, c, run::maintenance::execute_prune))
            },
            error_policy,
            Arc::clone(&ctx),
        );
    tracing::info!(namespace = ns.unwrap_or("(all)"), "controllers running");
    let controllers = async {
        tokio::join!(
            drain(schedules, "schedule"),
            drain(backups, "backup"),
            drain(checks, "check"),
            drain(prunes, "prune"),
        );
    };
    tokio::select! {
        () = controllers => Ok(()),
        lost = elector.keep(leading_tx) => {
            metrics.leader.set(0);
            Err(lost.into())
        }
        () = shutdown_signal() => {
            tracing::info!("shutting down: releasing the Lease; unfinished runs resume on the next leader");
            elector.release().await;
            metrics.leader.set(0);
            Ok(())
        }
    }
}

/// Deleted Schedules get no reconcile (there is nothing left to reconcile), so their metric series
/// are swept against a fresh list of the Schedules that exist.
async fn sweep_schedule_metrics(api: Api<Schedule>, metrics: Metrics) {
    loop {
        tokio::time::sleep(Duration::from_secs(15)).await;
        match api.list(&kube::api::ListParams::default()).await {
            Ok(list) => {
                let live = list
                    .items
                    .iter()
                    .map(|s| (s.namespace().unwrap_or_default(), s.name_any()))
                    .collect();
                metrics.forget_schedules_except(&live);
            }
            Err(e) => tracing::debug!(error = %e, "listing Schedules for the metrics sweep"),
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
