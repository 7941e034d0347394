//! Process plumbing both binaries need, written once: logging, TLS files, shutdown signals and the
//! HTTP endpoint that serves metrics and health.

use std::net::SocketAddr;
use std::path::Path;

use tokio::net::TcpListener;

/// Structured logging through `tracing`: `RUST_LOG` filters (else `default_filter`), `--log-json`
/// for log pipelines. A second call (several agents in one test process) is not an error.
pub fn init_logging(json: bool, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{what} is required with TLS (set its flag)")]
    MissingFile { what: &'static str },
    #[error("reading {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A PEM file named by a flag; `what` names it in the error ("the CA certificate").
pub fn read_pem(what: &'static str, path: Option<&Path>) -> Result<Vec<u8>, RuntimeError> {
    let path = path.ok_or(RuntimeError::MissingFile { what })?;
    std::fs::read(path).map_err(|source| RuntimeError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Resolves on SIGTERM or SIGINT (logging which). Without signal handlers it never resolves, and
/// says so.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Binds `addr` now (so a port conflict fails start-up) and serves `router` in a task until
/// `shutdown` resolves.
pub async fn serve_http(
    addr: SocketAddr,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, RuntimeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| RuntimeError::Bind { addr, source })?;
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    }))
}
