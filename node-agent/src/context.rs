//! What every operation needs: the inventory, the limiter, metrics and how to run restic.

use std::path::PathBuf;
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use restic_wrap::options::GlobalOptions;
use restic_wrap::{
    Backend, Limits, LockInfo, LockObserver, LockPolicy, Repository, Restic, Sandbox,
};
use stowage_proto::v1::{Phase, Progress};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::AgentError;
use crate::inventory::{Inventory, VolumeEntry};
use crate::limiter::{Limiter, Slot};
use crate::memory::{self, Operation};
use crate::metrics::Metrics;

pub struct AgentContext {
    pub node_name: String,
    pub inventory: Arc<Inventory>,
    pub limiter: Limiter,
    pub metrics: Metrics,
    pub restic_bin: PathBuf,
    pub bwrap: PathBuf,
    pub cache_dir: PathBuf,
    /// Where local repositories may live (empty: none may).
    pub local_roots: Vec<PathBuf>,
    pub lock_policy: LockPolicy,
    pub limits: Limits,
    /// Numbers sandboxes, so each has a hostname of its own (see [`Sandbox::new`]).
    pub sandboxes: AtomicU64,
    /// Cancelled on SIGTERM: every operation stops its restic and returns.
    pub shutdown: CancellationToken,
    pub parents: ParentCache,
    /// Snapshots restic listed, so that a restore of one just listed need not list again.
    pub known_snapshots: crate::known_snapshots::KnownSnapshots,
    /// For exec into pods on this node (backup commands, hooks); `None` without API access.
    pub kube: Option<kube::Client>,
    /// Restore staging directories in use, which recovery passes leave alone.
    pub staging: crate::staging::Active,
    /// What drills leave free of the cache filesystem, in percent (`--verify-keep-free-percent`).
    pub verify_keep_free_percent: u8,
    /// `--maintenance-only`: no volume operation is served.
    pub maintenance_only: bool,
}

/// A volume identity within one repository.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ParentKey {
    pub repository: String,
    pub identity: String,
}

/// The last snapshot this agent made per identity, used as the next backup's parent. Only a hint:
/// a stale entry costs re-reading changed files, a pruned one a retry with a fresh lookup.
#[derive(Debug, Default)]
pub struct ParentCache(std::sync::Mutex<std::collections::HashMap<ParentKey, String>>);

/// Entries kept at most; identities on one node are far fewer.
const PARENT_CACHE_MAX: usize = 10_000;

impl ParentCache {
    pub fn get(&self, key: &ParentKey) -> Option<String> {
        self.0.lock().ok()?.get(key).cloned()
    }

    pub fn remember(&self, key: ParentKey, snapshot: String) {
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= PARENT_CACHE_MAX {
                m.clear();
            }
            m.insert(key, snapshot);
        }
    }

    pub fn forget(&self, key: &ParentKey) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(key);
        }
    }
}

impl AgentContext {
    /// A command's time limit: the one requested (0: `default`), never beyond `--max-duration`. A
    /// command restore or backup command holds one of the node's slots while it runs; its limit
    /// comes from a pod annotation, which must not let a tenant hold a slot for ever.
    pub fn command_timeout(
        &self,
        requested_seconds: u32,
        default: std::time::Duration,
    ) -> std::time::Duration {
        let wanted = match requested_seconds {
            0 => default,
            s => std::time::Duration::from_secs(u64::from(s)),
        };
        if self.limits.max.is_zero() {
            wanted
        } else {
            wanted.min(self.limits.max)
        }
    }

    /// The volume, if it is on this node now.
    pub fn volume(&self, r: &stowage_proto::v1::VolumeRef) -> Result<VolumeEntry, AgentError> {
        self.inventory
            .lookup(&r.pod_uid, &r.volume_name)
            .ok_or_else(|| AgentError::VolumeNotFound {
                pod_uid: r.pod_uid.clone(),
                volume_name: r.volume_name.clone(),
                node: self.node_name.clone(),
            })
    }

    /// restic's estimated peak memory for `op` on `repo`, in MiB, from what this node knows of the
    /// repository's index.
    pub fn memory_estimate(&self, op: Operation, repo: &Repository) -> u64 {
        memory::estimate_mib(op, memory::index_bytes(repo, &self.cache_for(repo)))
    }

    /// Waits for a slot under the node's limits (`namespace`'s share, count and memory budget),
    /// telling the client when and why it has to queue.
    pub async fn slot(
        &self,
        op: Operation,
        namespace: &str,
        repo: &Repository,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<Slot, AgentError> {
        self.slot_with(op, 0, namespace, repo, progress, cancel)
            .await
    }

    /// [`AgentContext::slot`] for an operation that needs `extra_mib` more than its estimate from
    /// the index (a restore's tree).
    pub async fn slot_with(
        &self,
        op: Operation,
        extra_mib: u64,
        namespace: &str,
        repo: &Repository,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<Slot, AgentError> {
        let need = self.memory_estimate(op, repo).saturating_add(extra_mib);
        if let Some(why) = self.limiter.would_wait(namespace, need) {
            progress.phase(Phase::Queued, why);
        }
        tokio::select! {
            slot = self.limiter.acquire(namespace, need) => slot.ok_or(AgentError::ShuttingDown),
            _ = cancel.cancelled() => Err(AgentError::Cancelled),
        }
    }

    /// restic's cache for one repository. Each repository has its own directory, so a sandbox that
    /// binds the cache exposes no other tenant's cached metadata.
    pub fn cache_for(&self, repo: &Repository) -> PathBuf {
        self.cache_dir.join(format!(
            "{:016x}",
            stowage_common::hash::fnv1a(repo.location().as_bytes())
        ))
    }

    /// A fresh sandbox (own hostname) with bubblewrap from the flags. The caller adds the binds.
    pub fn sandbox(&self) -> Sandbox {
        let n = self.sandboxes.fetch_add(1, Ordering::Relaxed);
        // A hostname is at most 64 bytes; keep the sequence number whole.
        let suffix = format!(".sbx-{}-{n}", std::process::id());
        let node: String = self.node_name.chars().take(64 - suffix.len()).collect();
        Sandbox::new(&self.bwrap, format!("{node}{suffix}"))
    }

    /// The host directory of a local repository, which a sandbox must bind; `None` for S3/REST.
    pub fn local_repository(repo: &Repository) -> Option<PathBuf> {
        match &repo.backend {
            Backend::Local { path } => Some(PathBuf::from(path)),
            _ => None,
        }
    }

    /// A restic bound to `repo`, with this agent's cache, the request's bandwidth limits and the lock
    /// policy; lock waits and removals go to metrics and, as progress, to `progress`.
    pub fn restic(
        &self,
        repo: Repository,
        spec: Option<&stowage_proto::v1::Repository>,
        progress: Option<ProgressSink>,
    ) -> Restic {
        let limits = spec.map_or((0, 0), |r| (r.limit_upload_kib, r.limit_download_kib));
        let observer = Arc::new(LockMetrics {
            metrics: self.metrics.clone(),
            progress,
        });
        let cache_dir = self.cache_for(&repo);
        crate::cache::touch(&cache_dir);
        Restic::new(&self.restic_bin, repo)
            .with_limits(self.limits)
            .with_global(GlobalOptions {
                cache_dir: Some(cache_dir),
                cleanup_cache: true,
                limit_upload: Some(limits.0),
                limit_download: Some(limits.1),
                ..Default::default()
            })
            .with_lock_policy(self.lock_policy.clone(), observer)
    }
}

/// Sends progress messages of one operation; the message wrapper differs per RPC.
#[derive(Clone)]
pub struct ProgressSink {
    send: Arc<dyn Fn(Progress) -> bool + Send + Sync>,
}

impl ProgressSink {
    pub fn new<T: Send + 'static>(
        tx: mpsc::Sender<Result<T, tonic::Status>>,
        wrap: fn(Progress) -> T,
    ) -> Self {
        Self {
            // try_send: progress is advisory; a slow client must not stall restic's output.
            send: Arc::new(move |p| tx.try_send(Ok(wrap(p))).is_ok()),
        }
    }

    pub fn send(&self, p: Progress) {
        let _ = (self.send)(p);
    }

    pub fn phase(&self, phase: Phase, message: impl Into<String>) {
        self.send(Progress {
            phase: phase.into(),
            message: message.into(),
            ..Default::default()
        });
    }
}

struct LockMetrics {
    metrics: Metrics,
    progress: Option<ProgressSink>,
}

impl LockObserver for LockMetrics {
    fn waiting(&self, lock: &LockInfo) {
        self.metrics.lock_waits.inc();
        if let Some(p) = &self.progress {
            p.phase(
                Phase::WaitingForLock,
                format!("waiting for the repository lock held by {}", lock.holder()),
            );
        }
    }

    fn removed(&self, lock: &LockInfo) {
        self.metrics.lock_removals.inc();
        tracing::warn!(lock = %lock, "removed a stale repository lock");
        if let Some(p) = &self.progress {
            p.send(Progress {
                phase: Phase::Running.into(),
                removed_lock: format!(
                    "removed the stale repository lock of {} with restic unlock (not refreshed for over 30 minutes: its holder is gone)",
                    lock.holder()
                ),
                ..Default::default()
            });
        }
    }
}
