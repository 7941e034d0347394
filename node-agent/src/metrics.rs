//! The agent's Prometheus metrics. Label values are bounded: results are a fixed set, and
//! namespace/pvc are the identities of volumes on this node. No snapshot ids, no error strings.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// Outcomes of a backup, each a `result` label value that exists from start-up.
pub const BACKUP_RESULTS: [&str; 5] = ["succeeded", "partial", "skipped", "failed", "cancelled"];
pub const RESTORE_RESULTS: [&str; 3] = ["succeeded", "failed", "cancelled"];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub volumes: IntGauge,
    pub backups: IntCounterVec,
    pub backup_duration: Histogram,
    pub backup_bytes_added: IntCounter,
    pub backup_bytes_processed: IntCounter,
    pub last_success: GaugeVec,
    pub running: IntGauge,
    pub queued: IntGauge,
    pub cache_bytes: IntGauge,
    pub memory_budget: IntGauge,
    pub memory_reserved: IntGauge,
    pub lock_removals: IntCounter,
    pub lock_waits: IntCounter,
    pub restores: IntCounterVec,
    pub maintenance: IntCounterVec,
    pub restore_duration: Histogram,
    pub restore_bytes: IntCounter,
    pub hook_runs: IntCounterVec,
    pub hook_duration: HistogramVec,
    pub stream_bytes: IntCounter,
    /// Verification drills finished on this node, by result, and the bytes they read back.
    pub verifies: IntCounterVec,
    pub verify_bytes: IntCounter,
    pub ready: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("registering metric: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// The `kind` label of command metrics.
pub const HOOK_KINDS: [&str; 3] = ["pre", "post", "backup-command"];
/// The `result` label of command metrics.
pub const HOOK_RESULTS: [&str; 3] = ["succeeded", "failed", "timed_out"];

/// Durations from sub-second to hours: the range of volume backups.
const DURATION_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 10800.0,
];

impl Metrics {
    pub fn new(node_name: &str, restic_version: &str) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let volumes = IntGauge::new(
            "stowage_agent_volumes",
            "Persistent volumes discovered on this node.",
        )?;
        let backups = IntCounterVec::new(
            Opts::new(
                "stowage_agent_backups_total",
                "Volume backups finished, by result.",
            ),
            &["result"],
        )?;
        let backup_duration = Histogram::with_opts(
            HistogramOpts::new(
                "stowage_agent_backup_duration_seconds",
                "Wall time of volume backups, queueing excluded.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        )?;
        let backup_bytes_added = IntCounter::new(
            "stowage_agent_backup_bytes_added_total",
            "Bytes added to repositories by backups (after deduplication and compression).",
        )?;
        let backup_bytes_processed = IntCounter::new(
            "stowage_agent_backup_bytes_processed_total",
            "Bytes read from volumes by backups, advanced as restic reports progress.",
        )?;
        let last_success = GaugeVec::new(
            Opts::new(
                "stowage_agent_last_success_timestamp_seconds",
                "Unix time of the last successful backup of a volume identity (namespace/pvc).",
            ),
            &["namespace", "pvc"],
        )?;
        let running = IntGauge::new(
            "stowage_agent_running_operations",
            "Volume operations running now.",
        )?;
        let queued = IntGauge::new(
            "stowage_agent_queued_operations",
            "Operations waiting for a slot under --max-concurrent or for room in --memory-budget.",
        )?;
        let cache_bytes = IntGauge::new(
            "stowage_agent_cache_bytes",
            "Bytes in restic's caches on this node, as of the last sweep (--cache-sweep-interval).",
        )?;
        let memory_budget = IntGauge::new(
            "stowage_agent_memory_budget_bytes",
            "The --memory-budget for restic processes on this node (0: none).",
        )?;
        let memory_reserved = IntGauge::new(
            "stowage_agent_memory_reserved_bytes",
            "Memory reserved by running restic processes under --memory-budget (their estimates).",
        )?;
        let lock_removals = IntCounter::new(
            "stowage_agent_restic_lock_removals_total",
            "Stale repository locks removed under the lock-age policy.",
        )?;
        let lock_waits = IntCounter::new(
            "stowage_agent_restic_lock_waits_total",
            "Times an operation found the repository locked and waited.",
        )?;
        let restores = IntCounterVec::new(
            Opts::new(
                "stowage_agent_restores_total",
                "Restores finished, by result.",
            ),
            &["result"],
        )?;
        let maintenance = IntCounterVec::new(
            Opts::new(
                "stowage_agent_maintenance_total",
                "Repository checks and prunes finished, by kind and result.",
            ),
            &["kind", "result"],
        )?;
        let restore_duration = Histogram::with_opts(
            HistogramOpts::new(
                "stowage_agent_restore_duration_seconds",
                "Wall time of restores, queueing excluded.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        )?;
        let restore_bytes = IntCounter::new(
            "stowage_agent_restore_bytes_total",
            "Bytes of file content restored.",
        )?;
        let info = GaugeVec::new(
            Opts::new(
                "stowage_agent_info",
                "Constant 1, labelled with the agent's node, its version and restic's.",
            ),
            &["node", "version", "restic_version"],
        )?;
        info.with_label_values(&[node_name, env!("CARGO_PKG_VERSION"), restic_version])
            .set(1.0);

        for r in BACKUP_RESULTS {
            backups.with_label_values(&[r]);
        }
        for r in RESTORE_RESULTS {
            restores.with_label_values(&[r]);
            for kind in ["check", "prune"] {
                maintenance.with_label_values(&[kind, r]);
            }
        }
        registry.register(Box::new(volumes.clone()))?;
        registry.register(Box::new(backups.clone()))?;
        registry.register(Box::new(backup_duration.clone()))?;
        registry.register(Box::new(backup_bytes_added.clone()))?;
        registry.register(Box::new(backup_bytes_processed.clone()))?;
        registry.register(Box::new(last_success.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(cache_bytes.clone()))?;
        registry.register(Box::new(memory_budget.clone()))?;
        registry.register(Box::new(memory_reserved.clone()))?;
        registry.register(Box::new(lock_removals.clone()))?;
        registry.register(Box::new(lock_waits.clone()))?;
        registry.register(Box::new(restores.clone()))?;
        registry.register(Box::new(maintenance.clone()))?;
        registry.register(Box::new(restore_duration.clone()))?;
        registry.register(Box::new(restore_bytes.clone()))?;
        let hook_runs = IntCounterVec::new(
            Opts::new(
                "stowage_agent_hook_runs_total",
                "Commands run in pods: pre/post hooks and backup commands, by kind and result.",
            ),
            &["kind", "result"],
        )?;
        let hook_duration = HistogramVec::new(
            HistogramOpts::new(
                "stowage_agent_hook_duration_seconds",
                "Wall time of commands run in pods, by kind.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["kind"],
        )?;
        let stream_bytes = IntCounter::new(
            "stowage_agent_stream_bytes_total",
            "Bytes of backup commands' output streamed into restic.",
        )?;
        for kind in HOOK_KINDS {
            for result in HOOK_RESULTS {
                hook_runs.with_label_values(&[kind, result]);
            }
        }
        registry.register(Box::new(hook_runs.clone()))?;
        registry.register(Box::new(hook_duration.clone()))?;
        registry.register(Box::new(stream_bytes.clone()))?;
        let verifies = IntCounterVec::new(
            Opts::new(
                "stowage_agent_verifies_total",
                "Verification drills (one identity each) finished on this node, by result.",
            ),
            &["result"],
        )?;
        let verify_bytes = IntCounter::new(
            "stowage_agent_verify_bytes_total",
            "Bytes drills on this node restored and verified (or hashed, for backup commands).",
        )?;
        for r in RESTORE_RESULTS {
            verifies.with_label_values(&[r]);
        }
        registry.register(Box::new(verifies.clone()))?;
        registry.register(Box::new(verify_bytes.clone()))?;
        registry.register(Box::new(info))?;
        Ok(Self {
            registry,
            volumes,
            backups,
            backup_duration,
            backup_bytes_added,
            backup_bytes_processed,
            last_success,
            running,
            queued,
            cache_bytes,
            memory_budget,
            memory_reserved,
            lock_removals,
            lock_waits,
            restores,
            maintenance,
            restore_duration,
            restore_bytes,
            hook_runs,
            hook_duration,
            stream_bytes,
            verifies,
            verify_bytes,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn record_success(&self, namespace: &str, pvc: &str) {
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        self.last_success
            .with_label_values(&[namespace, pvc])
            .set(now);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// `/metrics` and `/healthz` (200 once the volume inventory is loaded, 503 before).
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/healthz", get(health_handler))
            .with_state(self.clone())
    }
}

/// A gauge that goes up now and down when dropped, so early returns cannot leak a count.
pub struct GaugeGuard(IntGauge, i64);

impl GaugeGuard {
    pub fn new(g: &IntGauge) -> Self {
        Self::add(g, 1)
    }

    /// Adds `n` now and subtracts it when dropped.
    pub fn add(g: &IntGauge, n: i64) -> Self {
        g.add(n);
        Self(g.clone(), n)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.sub(self.1);
    }
}

async fn metrics_handler(State(m): State<Metrics>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
}

async fn health_handler(State(m): State<Metrics>) -> impl IntoResponse {
    if m.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "volume inventory not loaded yet\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_series_exist_before_first_event() {
        let m = Metrics::new("node-1", "0.19.1").unwrap();
        let text = m.render();
        for r in BACKUP_RESULTS {
            assert!(
                text.contains(&format!("stowage_agent_backups_total{{result=\"{r}\"}} 0")),
                "{r}\n{text}"
            );
        }
        for r in RESTORE_RESULTS {
            assert!(
                text.contains(&format!("stowage_agent_restores_total{{result=\"{r}\"}} 0")),
                "{r}"
            );
        }
        assert!(text.contains("stowage_agent_info{node=\"node-1\""));
        m.record_success("shop", "data");
        assert!(m.render().contains(
            "stowage_agent_last_success_timestamp_seconds{namespace=\"shop\",pvc=\"data\"}"
        ));
    }

    #[test]
    fn gauge_guard_restores_on_drop() {
        let m = Metrics::new("n", "0.19.1").unwrap();
        {
            let _g = GaugeGuard::new(&m.running);
            assert_eq!(m.running.get(), 1);
        }
        assert_eq!(m.running.get(), 0);
    }
}
