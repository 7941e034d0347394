//! The coordinator's Prometheus metrics, served on `/metrics` next to `/healthz`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const RUN_KINDS: [&str; 4] = ["backup", "check", "prune", "verify"];
pub const RUN_RESULTS: [&str; 3] = ["succeeded", "partially_failed", "failed"];
/// The `exclusive` label of `stowage_repository_locks`.
pub const LOCK_KINDS: [&str; 3] = ["true", "false", "unknown"];
pub const AGENT_STATES: [&str; 2] = ["ready", "not_ready"];

/// Run durations: seconds (a check of a small repository) to hours (a first full backup).
const DURATION_BUCKETS: [f64; 12] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub runs: IntCounterVec,
    pub run_duration: HistogramVec,
    pub next_run: GaugeVec,
    pub period: GaugeVec,
    pub last_success: GaugeVec,
    pub check_success: GaugeVec,
    pub last_check: GaugeVec,
    pub repository_snapshots: GaugeVec,
    pub repository_size: GaugeVec,
    pub key_age: GaugeVec,
    pub lock_removals: IntCounterVec,
    pub repository_locks: IntGaugeVec,
    pub oldest_lock_age: GaugeVec,
    pub missed_runs: IntCounter,
    pub skipped_runs: IntCounter,
    pub agents: IntGaugeVec,
    pub volume_dispatches: IntCounter,
    pub leader: IntGauge,
    pub verify_runs: IntCounterVec,
    pub verify_success: GaugeVec,
    pub verify_bytes: IntCounter,
    pub last_verified: GaugeVec,
    pub command_last_verified: GaugeVec,
    /// Volumes (namespace, pvc) and commands (namespace, owner, container) with a last-verified
    /// series, so those of deleted PVCs and owners can be removed.
    verified: Arc<Mutex<BTreeSet<(String, String, String)>>>,
    ready: Arc<AtomicBool>,
    /// Schedules (namespace, name) with series, so those of deleted Schedules can be removed.
    schedules: Arc<Mutex<BTreeSet<(String, String)>>>,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let runs = IntCounterVec::new(
            Opts::new(
                "stowage_coordinator_runs_total",
                "Backup, Check and Prune runs finished, by kind and result.",
            ),
            &["kind", "result"],
        )?;
        let run_duration = HistogramVec::new(
            HistogramOpts::new(
                "stowage_coordinator_run_duration_seconds",
                "Wall time of finished runs, by kind.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["kind"],
        )?;
        let next_run = GaugeVec::new(
            Opts::new(
                "stowage_schedule_next_run_timestamp_seconds",
                "When each Schedule action fires next (Unix time; -random variants resolved).",
            ),
            &["namespace", "schedule", "action"],
        )?;
        let period = GaugeVec::new(
            Opts::new(
                "stowage_schedule_period_seconds",
                "Seconds between each Schedule action's next two fire times (what staleness alerts multiply).",
            ),
            &["namespace", "schedule", "action"],
        )?;
        let last_success = GaugeVec::new(
            Opts::new(
                "stowage_schedule_last_success_timestamp_seconds",
                "Completion time of each Schedule's last Succeeded backup run (Unix time).",
            ),
            &["namespace", "schedule"],
        )?;
        let check_success = GaugeVec::new(
            Opts::new(
                "stowage_repository_check_success",
                "1 if the newest Check of each Schedule's repository passed, 0 if it found damage.",
            ),
            &["namespace", "schedule"],
        )?;
        let last_check = GaugeVec::new(
            Opts::new(
                "stowage_repository_last_check_timestamp_seconds",
                "Completion time of each Schedule's newest passing Check (Unix time).",
            ),
            &["namespace", "schedule"],
        )?;
        let repository_snapshots = GaugeVec::new(
            Opts::new(
                "stowage_repository_snapshots",
                "Snapshots in each Schedule's repository, after its newest Check or Prune.",
            ),
            &["namespace", "schedule"],
        )?;
        let repository_size = GaugeVec::new(
            Opts::new(
                "stowage_repository_size_bytes",
                "Size of each Schedule's repository (restic stats --mode raw-data), after its newest Check or Prune.",
            ),
            &["namespace", "schedule"],
        )?;
        let lock_removals = IntCounterVec::new(
            Opts::new(
                "stowage_repository_lock_removals_total",
                "Stale repository locks removed with restic unlock during runs, per Schedule (\"\" for runs without one).",
            ),
            &["namespace", "schedule"],
        )?;
        let repository_locks = IntGaugeVec::new(
            Opts::new(
                "stowage_repository_locks",
                "Lock files in each Schedule's repository, by kind (exclusive \"unknown\": listed but not read), at the newest look: every run's end, and every --lock-refresh-interval while a run waits.",
            ),
            &["namespace", "schedule", "exclusive"],
        )?;
        let oldest_lock_age = GaugeVec::new(
            Opts::new(
                "stowage_repository_oldest_lock_age_seconds",
                "Age of the oldest lock in each Schedule's repository since its holder created or refreshed it (0: none). restic refreshes live locks every 5 minutes and treats those older than 30 as stale.",
            ),
            &["namespace", "schedule"],
        )?;
        let missed_runs = IntCounter::new(
            "stowage_coordinator_missed_runs_total",
            "Fire times not run because they were missed by more than --missed-run-deadline.",
        )?;
        let skipped_runs = IntCounter::new(
            "stowage_coordinator_skipped_runs_total",
            "Fire times skipped because the previous run of the same action was still running.",
        )?;
        let agents = IntGaugeVec::new(
            Opts::new(
                "stowage_coordinator_agents",
                "Agent pods known to the coordinator, by state.",
            ),
            &["state"],
        )?;
        let volume_dispatches = IntCounter::new(
            "stowage_coordinator_volume_dispatches_total",
            "Volume backups sent to agents by this replica.",
        )?;
        let leader = IntGauge::new(
            "stowage_coordinator_leader",
            "1 while this replica holds the leader Lease and dispatches work.",
        )?;
        let verify_runs = IntCounterVec::new(
            Opts::new(
                "stowage_verify_runs_total",
                "Verify runs (verification drills) finished, by result.",
            ),
            &["result"],
        )?;
        let verify_bytes = IntCounter::new(
            "stowage_verify_bytes_total",
            "Bytes verification drills restored and verified (or hashed, for backup commands).",
        )?;
        let last_verified = GaugeVec::new(
            Opts::new(
                "stowage_volume_last_verified_timestamp_seconds",
                "Completion time of each volume's newest successful verification drill (Unix time).",
            ),
            &["namespace", "pvc"],
        )?;
        let command_last_verified = GaugeVec::new(
            Opts::new(
                "stowage_command_last_verified_timestamp_seconds",
                "Completion time of each backup command's newest successful verification drill (Unix time).",
            ),
            &["namespace", "owner", "container"],
        )?;
        for kind in RUN_KINDS {
            for result in RUN_RESULTS {
                runs.with_label_values(&[kind, result]);
            }
        }
        for result in RUN_RESULTS {
            verify_runs.with_label_values(&[result]);
        }
        let verify_success = GaugeVec::new(
            Opts::new(
                "stowage_schedule_verify_success",
                "1 if the newest Verify run of each Schedule brought every snapshot back, 0 if not.",
            ),
            &["namespace", "schedule"],
        )?;
        for state in AGENT_STATES {
            agents.with_label_values(&[state]);
        }
        registry.register(Box::new(runs.clone()))?;
        registry.register(Box::new(run_duration.clone()))?;
        registry.register(Box::new(next_run.clone()))?;
        registry.register(Box::new(period.clone()))?;
        registry.register(Box::new(last_success.clone()))?;
        registry.register(Box::new(check_success.clone()))?;
        registry.register(Box::new(last_check.clone()))?;
        registry.register(Box::new(repository_snapshots.clone()))?;
        registry.register(Box::new(repository_size.clone()))?;
        let key_age = GaugeVec::new(
            Opts::new(
                "stowage_repository_key_age_seconds",
                "Age of the key the Schedule's repository password opens (restic key list), at the newest figures.",
            ),
            &["namespace", "schedule"],
        )?;
        registry.register(Box::new(key_age.clone()))?;
        registry.register(Box::new(lock_removals.clone()))?;
        registry.register(Box::new(repository_locks.clone()))?;
        registry.register(Box::new(oldest_lock_age.clone()))?;
        registry.register(Box::new(missed_runs.clone()))?;
        registry.register(Box::new(skipped_runs.clone()))?;
        registry.register(Box::new(agents.clone()))?;
        registry.register(Box::new(volume_dispatches.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(verify_runs.clone()))?;
        registry.register(Box::new(verify_success.clone()))?;
        registry.register(Box::new(verify_bytes.clone()))?;
        registry.register(Box::new(last_verified.clone()))?;
        registry.register(Box::new(command_last_verified.clone()))?;
        Ok(Self {
            registry,
            runs,
            run_duration,
            next_run,
            period,
            last_success,
            check_success,
            last_check,
            repository_snapshots,
            repository_size,
            key_age,
            lock_removals,
            repository_locks,
            oldest_lock_age,
            missed_runs,
            skipped_runs,
            agents,
            volume_dispatches,
            leader,
            verify_runs,
            verify_success,
            verify_bytes,
            last_verified,
            command_last_verified,
            verified: Arc::new(Mutex::new(BTreeSet::new())),
            ready: Arc::new(AtomicBool::new(false)),
            schedules: Arc::new(Mutex::new(BTreeSet::new())),
        })
    }

    /// Notes that Schedule `namespace/name` has series.
    pub fn schedule_seen(&self, namespace: &str, name: &str) {
        if let Ok(mut s) = self.schedules.lock() {
            s.insert((namespace.to_string(), name.to_string()));
        }
    }

    /// Removes the series of Schedules that no longer exist: alerts on a deleted Schedule's stale
    /// last-success time would otherwise fire forever.
    pub fn forget_schedules_except(&self, live: &BTreeSet<(String, String)>) {
        let Ok(mut seen) = self.schedules.lock() else {
            return;
        };
        let gone: Vec<(String, String)> = seen.difference(live).cloned().collect();
        for (ns, name) in gone {
            for action in RUN_KINDS {
                let _ = self.next_run.remove_label_values(&[&ns, &name, action]);
                let _ = self.period.remove_label_values(&[&ns, &name, action]);
            }
            let _ = self.last_success.remove_label_values(&[&ns, &name]);
            let _ = self.check_success.remove_label_values(&[&ns, &name]);
            let _ = self.verify_success.remove_label_values(&[&ns, &name]);
            let _ = self.last_check.remove_label_values(&[&ns, &name]);
            let _ = self.repository_snapshots.remove_label_values(&[&ns, &name]);
            let _ = self.repository_size.remove_label_values(&[&ns, &name]);
            let _ = self.key_age.remove_label_values(&[&ns, &name]);
            for kind in LOCK_KINDS {
                let _ = self
                    .repository_locks
                    .remove_label_values(&[&ns, &name, kind]);
            }
            let _ = self.oldest_lock_age.remove_label_values(&[&ns, &name]);
            seen.remove(&(ns, name));
        }
    }

    /// Records a successful drill of a volume (`owner` empty) or a command at Unix time `at`; an
    /// older time than the one recorded changes nothing.
    pub fn verified(&self, namespace: &str, pvc_or_owner: &str, container: Option<&str>, at: f64) {
        let gauge = match container {
            None => self
                .last_verified
                .with_label_values(&[namespace, pvc_or_owner]),
            Some(c) => self
                .command_last_verified
                .with_label_values(&[namespace, pvc_or_owner, c]),
        };
        if gauge.get() < at {
            gauge.set(at);
        }
        if let Ok(mut v) = self.verified.lock() {
            v.insert((
                namespace.to_string(),
                pvc_or_owner.to_string(),
                container.unwrap_or_default().to_string(),
            ));
        }
    }

    /// Removes the last-verified series of `namespace` whose volume or command is not in `live`
    /// ((pvc, "") or (owner, container)): an alert on a deleted PVC would otherwise fire forever.
    pub fn forget_verified_except(&self, namespace: &str, live: &BTreeSet<(String, String)>) {
        let Ok(mut seen) = self.verified.lock() else {
            return;
        };
        seen.retain(|(ns, what, container)| {
            // Command series stay (their owners come and go with rollouts); volumes are swept.
            if ns != namespace
                || !container.is_empty()
                || live.contains(&(what.clone(), container.clone()))
            {
                return true;
            }
            let _ = if container.is_empty() {
                self.last_verified.remove_label_values(&[ns, what])
            } else {
                self.command_last_verified
                    .remove_label_values(&[ns, what, container])
            };
            false
        });
    }

    /// Healthy once the process has a working API client (leader or standby alike).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/healthz", get(health_handler))
            .with_state(self.clone())
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
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_issue_metric_is_exposed_with_zeroed_series() {
        let m = Metrics::new().unwrap();
        m.next_run
            .with_label_values(&["shop", "nightly", "backup"])
            .set(1.0);
        m.last_success
            .with_label_values(&["shop", "nightly"])
            .set(1.0);
        m.run_duration.with_label_values(&["backup"]).observe(3.0);
        m.schedule_seen("shop", "nightly");
        let text = m.render();
        for name in [
            "stowage_coordinator_runs_total{kind=\"backup\",result=\"failed\"} 0",
            "stowage_coordinator_run_duration_seconds_bucket",
            "stowage_schedule_next_run_timestamp_seconds{action=\"backup\"",
            "stowage_schedule_last_success_timestamp_seconds{",
            "stowage_coordinator_missed_runs_total 0",
            "stowage_coordinator_agents{state=\"ready\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        m.forget_schedules_except(&BTreeSet::new());
        let text = m.render();
        assert!(!text.contains("schedule=\"nightly\""), "{text}");
    }
}
