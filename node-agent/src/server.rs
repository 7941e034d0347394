//! Wiring: metrics and health first, then the inventory, then the gRPC API (mutual TLS unless
//! explicitly plaintext); SIGTERM stops accepting, cancels running work (restic is stopped and its
//! lock released) and exits.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use std::path::PathBuf;

use restic_wrap::{Limits, LockPolicy};
use stowage_proto::v1::FILE_DESCRIPTOR_SET;
use stowage_proto::v1::agent_server::AgentServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use stowage_common::runtime::{RuntimeError, serve_http, shutdown_signal};

use crate::authz::ClientIdentity;
use crate::config::Config;
use crate::context::AgentContext;
use crate::inventory::{Inventory, watch};
use crate::limiter::Limiter;
use crate::metrics::{Metrics, MetricsError};
use crate::service::AgentService;
use crate::tls_listener::{ReloadingConfig, TlsFiles};

/// How long shutdown waits for running operations to stop their restic.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} (--tls-cert, --tls-key and --tls-client-ca are required unless --insecure-plaintext)"
    )]
    Runtime(#[from] RuntimeError),
    #[error("restic is not usable: {0}")]
    Restic(#[from] restic_wrap::Error),
    #[error("{what} {name:?} is not an executable on PATH")]
    NotFound { what: &'static str, name: String },
    #[error(
        "the sandbox does not work ({detail}); the agent needs bubblewrap and CAP_SYS_ADMIN to create mount namespaces{hint}"
    )]
    Sandbox { detail: String, hint: &'static str },
    #[error("local repository root {path}: {source}")]
    LocalRoot {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--client-identity is required with TLS: name the coordinator's certificate identity")]
    MissingClientIdentity,
    #[error("creating the restic cache directory {path}: {source}")]
    CacheDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("watching the kubelet directory: {0}")]
    Watch(#[from] notify::Error),
    #[error("the agent's TLS files: {0}")]
    Tls(#[from] crate::tls_listener::StartError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The TLS files named by the flags, all three required.
fn tls_files(config: &Config) -> Result<TlsFiles, ServerError> {
    let required = |what, path: &Option<PathBuf>| {
        path.clone()
            .ok_or(ServerError::Runtime(RuntimeError::MissingFile { what }))
    };
    Ok(TlsFiles {
        cert: required("the agent's certificate", &config.tls_cert)?,
        key: required("the agent's key", &config.tls_key)?,
        client_ca: required("the client CA", &config.tls_client_ca)?,
    })
}

pub async fn run(config: Config) -> Result<(), ServerError> {
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    run_until(config, shutdown).await
}

/// Runs the agent until `shutdown` is cancelled.
/// `name` as an absolute path: itself when it has a slash, else the first match on PATH. The sandbox
/// binds the binary at its own path, so it must be absolute.
fn executable(what: &'static str, name: &std::path::Path) -> Result<PathBuf, ServerError> {
    if name.components().count() > 1 {
        return std::path::absolute(name).map_err(|_| ServerError::NotFound {
            what,
            name: name.display().to_string(),
        });
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| ServerError::NotFound {
            what,
            name: name.display().to_string(),
        })
}

/// What a failed sandbox most likely lacks, from bubblewrap's message.
fn sandbox_hint(detail: &str) -> &'static str {
    if detail.contains("pivot_root") {
        // containerd's, CRI-O's and Docker's RuntimeDefault seccomp profiles refuse pivot_root(2)
        // even with CAP_SYS_ADMIN, and bubblewrap always calls it.
        "; pivot_root(2) was refused, which is what the runtime's default seccomp profile does: run the agent container with seccompProfile Unconfined (the chart's agent.seccompProfile default) or a Localhost profile that allows pivot_root (docs/security.md, Seccomp)"
    } else if detail.contains("Permission denied") || detail.contains("Operation not permitted") {
        "; a security module may refuse mount(2): on AppArmor nodes set agent.appArmorProfile, on SELinux nodes see docs/security.md"
    } else {
        ""
    }
}

/// Runs `restic version` inside an empty sandbox: proves that bubblewrap can create its namespaces
/// here and that restic runs with nothing but itself (it must be a static binary).
async fn probe_sandbox(ctx: &AgentContext) -> Result<(), ServerError> {
    let spec = restic_wrap::command::CommandSpec {
        program: ctx.restic_bin.clone(),
        args: vec!["version".into()],
        env: Vec::new(),
        cwd: None,
        subcommand: "version".into(),
    };
    let spec = ctx.sandbox().wrap(&spec);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(&spec.program)
            .args(&spec.args)
            .env_clear()
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| ServerError::Sandbox {
        detail: "restic version did not answer within 30s".into(),
        hint: "",
    })?
    .map_err(|e| ServerError::Sandbox {
        detail: format!("starting {}: {e}", spec.program.display()),
        hint: "",
    })?;
    if out.status.success() {
        Ok(())
    } else {
        // bubblewrap's own message is one line; a bound keeps a stranger stderr out of the log.
        let detail: String = String::from_utf8_lossy(&out.stderr)
            .trim()
            .chars()
            .take(1024)
            .collect();
        Err(ServerError::Sandbox {
            hint: sandbox_hint(&detail),
            detail,
        })
    }
}

pub async fn run_until(config: Config, shutdown: CancellationToken) -> Result<(), ServerError> {
    let restic_bin = executable("restic", &config.restic)?;
    let bwrap = executable("bwrap", &config.bwrap)?;
    let version = restic_wrap::restic::version_of(&restic_bin).await?;
    if !config.insecure_plaintext && config.client_identities.is_empty() {
        return Err(ServerError::MissingClientIdentity);
    }
    for root in &config.local_repository_roots {
        std::fs::create_dir_all(root).map_err(|source| ServerError::LocalRoot {
            path: root.display().to_string(),
            source,
        })?;
    }
    let metrics = Metrics::new(&config.node_name, &version)?;
    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .map_err(|source| ServerError::Bind {
            what: "gRPC",
            addr: config.grpc_listen,
            source,
        })?;
    let metrics_stop = shutdown.clone();
    let metrics_task = serve_http(config.metrics_listen, metrics.router(), async move {
        metrics_stop.cancelled().await
    })
    .await?;

    let tls = if config.insecure_plaintext {
        tracing::warn!(
            "serving gRPC WITHOUT TLS (--insecure-plaintext): anyone who reaches the port can read every volume"
        );
        None
    } else {
        Some(ReloadingConfig::start(
            &tls_files(&config)?,
            shutdown.clone(),
        )?)
    };

    std::fs::create_dir_all(&config.cache_dir).map_err(|source| ServerError::CacheDir {
        path: config.cache_dir.display().to_string(),
        source,
    })?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<AgentServer<AgentService>>().await;

    let inventory = Arc::new(Inventory::new(&config.kubelet_dir, metrics.volumes.clone()));
    // A maintenance-only agent serves no volume: it neither scans nor watches a kubelet directory
    // (the coordinator's pod has none).
    let watcher = if config.maintenance_only {
        None
    } else {
        let inv = Arc::clone(&inventory);
        let _ = tokio::task::spawn_blocking(move || inv.full_scan()).await;
        Some(watch::spawn(
            Arc::clone(&inventory),
            config.resync_interval,
            shutdown.clone(),
        )?)
    };
    metrics.ready.store(true, Ordering::Release);
    tracing::info!(
        node = %config.node_name, volumes = inventory.list().len(), restic = %version,
        grpc = %config.grpc_listen, metrics = %config.metrics_listen, "agent ready"
    );

    let limiter = Limiter::new(
        config.max_concurrent,
        config.namespace_share(),
        config.memory_budget,
        metrics.clone(),
    );
    let kube = kubernetes_client().await;
    let ctx = Arc::new(AgentContext {
        node_name: config.node_name.clone(),
        inventory,
        limiter: limiter.clone(),
        metrics: metrics.clone(),
        restic_bin,
        bwrap,
        cache_dir: config.cache_dir.clone(),
        local_roots: config.local_repository_roots.clone(),
        lock_policy: LockPolicy {
            max_wait: config.lock_wait,
            stale_after: config.stale_lock_age,
            ..LockPolicy::default()
        },
        limits: Limits {
            stall: config.stall_timeout,
            max: config.max_duration,
        },
        sandboxes: Default::default(),
        shutdown: shutdown.clone(),
        parents: Default::default(),
        known_snapshots: Default::default(),
        kube,
        staging: crate::staging::Active::for_node(&config.node_name),
        verify_keep_free_percent: config.verify_keep_free_percent,
        maintenance_only: config.maintenance_only,
    });
    probe_sandbox(&ctx).await?;
    // A restore interrupted by the last agent's death left staging in its volume: a swap that had
    // not committed is rolled back (the original data returns), one that had is finished. In the
    // background, so that a large or hostile volume never delays serving; a restore into a volume
    // runs the same pass first, and the passes take turns (`staging::Active`).
    // A staging directory whose heartbeat is still fresh may be a just-killed agent's: it is looked
    // at again once the heartbeat has had time to go stale (a few passes, then the next restore
    // into the volume or the next start takes over).
    // A thread of its own, not the runtime's blocking pool: the runtime would wait for its sleeps
    // at shutdown.
    let recovering = Arc::clone(&ctx);
    let spawned = std::thread::Builder::new()
        .name("recovery".into())
        .spawn(move || {
            let mut volumes = recovering.inventory.list();
            for pass in 0..4 {
                if pass > 0 {
                    std::thread::sleep(crate::staging::HEARTBEAT_STALE + Duration::from_secs(2));
                }
                volumes.retain(|v| {
                    crate::safe_fs::open_root(&v.data_dir).is_ok_and(|root| {
                        crate::restore::recover_leftovers(
                            &recovering.staging,
                            &root,
                            &v.data_dir.display().to_string(),
                        )
                    })
                });
                if volumes.is_empty() {
                    break;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the recovery pass; restores still recover their volume first");
    }
    spawn_cache_sweeps(&config, metrics.clone(), shutdown.clone());
    let tasks = TaskTracker::new();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    health.set_serving::<AgentServer<AgentService>>().await;

    let router = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(authorized(
            AgentServer::new(AgentService::new(ctx, tasks.clone()))
                .max_decoding_message_size(stowage_proto::REQUEST_MAX)
                .max_encoding_message_size(stowage_proto::MESSAGE_MAX),
            &config,
        ));
    let stop = shutdown.clone();
    let stopped = async move { stop.cancelled().await };
    match tls {
        // client_auth is required: a client without a certificate from the CA is refused.
        Some(tls) => {
            let incoming = crate::tls_listener::incoming(grpc_listener, tls, shutdown.clone());
            router
                .serve_with_incoming_shutdown(incoming, stopped)
                .await?
        }
        None => {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(grpc_listener), stopped)
                .await?
        }
    }

    // Stop accepting queued work; running operations see the cancelled token and stop restic.
    tracing::info!("shutting down: cancelling running operations");
    limiter.close();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("operations did not stop within {SHUTDOWN_GRACE:?}");
    }
    if let Some(w) = watcher {
        let _ = w.await;
    }
    let _ = metrics_task.await;
    tracing::info!("agent stopped");
    Ok(())
}

/// The agent API behind the client-identity check (none in plaintext mode, where there is no
/// certificate to check).
fn authorized(
    server: AgentServer<AgentService>,
    config: &Config,
) -> InterceptedService<AgentServer<AgentService>, AllowAll> {
    let check = if config.insecure_plaintext {
        AllowAll::Everyone
    } else {
        AllowAll::Only(ClientIdentity::new(config.client_identities.clone()))
    };
    InterceptedService::new(server, check)
}

/// The interceptor in front of the agent API.
#[derive(Clone)]
enum AllowAll {
    Everyone,
    Only(ClientIdentity),
}

impl tonic::service::Interceptor for AllowAll {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        match self {
            AllowAll::Everyone => Ok(req),
            AllowAll::Only(id) => id.call(req),
        }
    }
}

/// Sweeps restic's caches (see [`crate::cache`]) every `--cache-sweep-interval`, the first time a
/// minute after start, and exports what they hold.
fn spawn_cache_sweeps(config: &Config, metrics: Metrics, shutdown: CancellationToken) {
    let root = config.cache_dir.clone();
    let policy = crate::cache::Policy {
        max_age: config.cache_max_age,
        max_bytes: config.cache_max_size_mib.saturating_mul(1024 * 1024),
        busy_within: config.max_duration,
    };
    let every = config.cache_sweep_interval.max(Duration::from_secs(1));
    tokio::spawn(async move {
        let mut wait = every.min(Duration::from_secs(60));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = every;
            let root = root.clone();
            let swept = tokio::task::spawn_blocking(move || {
                crate::cache::sweep(&root, policy, std::time::SystemTime::now())
            })
            .await;
            if let Ok(swept) = swept {
                metrics
                    .cache_bytes
                    .set(i64::try_from(swept.kept_bytes).unwrap_or(i64::MAX));
            }
        }
    });
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        shutdown_signal().await;
        shutdown.cancel();
    });
}

/// A client for exec into pods (backup commands, hooks): in-cluster, or from KUBECONFIG. Without
/// one the agent still backs up volumes; commands fail with a clear error.
async fn kubernetes_client() -> Option<kube::Client> {
    let inferred =
        tokio::time::timeout(std::time::Duration::from_secs(10), kube::Config::infer()).await;
    match inferred {
        Ok(Ok(config)) => match kube::Client::try_from(config) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "no Kubernetes client; backup commands and hooks are unavailable");
                None
            }
        },
        Ok(Err(e)) => {
            tracing::info!(error = %e, "no Kubernetes configuration; backup commands and hooks are unavailable");
            None
        }
        Err(_) => {
            tracing::warn!(
                "reading the Kubernetes configuration timed out; backup commands and hooks are unavailable"
            );
            None
        }
    }
}
