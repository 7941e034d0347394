//! What every reconciler and run shares.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use std::sync::{Arc, Mutex};

use kube::Client;

use crate::agents::AgentDirectory;
use crate::conditions::Notifier;
use crate::config::Config;
use crate::inspections::Inspector;
use crate::metrics::Metrics;
use crate::state::{Cache, Stores};
use stowage_api::{Backup, Check, Prune, Restore, Verify};

/// The runs the coordinator watches (one shared watch per kind feeds these and the controllers).
#[derive(Clone)]
pub struct RunStores {
    pub backups: Cache<Backup>,
    pub checks: Cache<Check>,
    pub prunes: Cache<Prune>,
    pub restores: Cache<Restore>,
    pub verifies: Cache<Verify>,
    /// Set when each run watch has delivered its first full list.
    pub ready: Vec<crate::state::Ready>,
}

pub struct Ctx {
    pub client: Client,
    /// PVCs, Pods and Secrets (key names only), from watches.
    pub stores: Stores,
    pub runs: RunStores,
    pub config: Config,
    pub agents: Arc<AgentDirectory>,
    pub notifier: Notifier,
    pub metrics: Metrics,
    /// Repository locks and figures between runs.
    pub inspector: Inspector,
    /// Slots for PreBackupPods starting at once (`--max-starting-prebackup-pods`), taken after
    /// the namespace's share (`--max-starting-prebackup-pods-per-namespace`).
    pub prebackup_starting: crate::prebackup_pod::StartSlots,
    /// The Schedule controllers' caches, set once they exist (the Schedule reconciler compares
    /// repository locations across namespaces).
    pub schedules: std::sync::OnceLock<Cache<stowage_api::Schedule>>,
    /// One volume restore at a time per target PVC (see [`RestoreTargets`]).
    pub restore_targets: RestoreTargets,
    /// UIDs of runs this process is executing, so a reconcile never starts one twice.
    active: Mutex<HashSet<String>>,
    /// Repositories known to exist. Opening one costs a restic run (and its key derivation), so a
    /// run checks only the first time; a repository removed later is re-created by the agent.
    known_repositories: Mutex<HashSet<String>>,
    /// Per Schedule UID and action, the newest fire time this process handled. The controller may
    /// hand a reconcile an object from its cache that predates our own status write; without this,
    /// missed fire times would be counted (and announced) twice.
    handled: Mutex<HashMap<(String, &'static str), DateTime<Utc>>>,
}

/// Volume restores into one PVC run one at a time, whichever node's agent runs them. A shared
/// (RWX) volume is mounted on several nodes, and two Restores into it would each swap the same
/// target. Every run goes through the one leading coordinator, so a lock here serialises them
/// cluster-wide; a new leader resumes runs one at a time per PVC the same way.
#[derive(Default)]
pub struct RestoreTargets {
    locks: Mutex<HashMap<(String, String), Turn>>,
}

/// One PVC's turn: held by the restore into it that runs.
type Turn = Arc<tokio::sync::Mutex<()>>;

/// Target PVCs with a lock at once; beyond it, idle locks are dropped.
const RESTORE_TARGETS_MAX: usize = 4096;

impl RestoreTargets {
    /// Waits for the PVC's turn; the turn lasts as long as the guard.
    pub async fn lock(&self, namespace: &str, pvc: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if locks.len() >= RESTORE_TARGETS_MAX {
                locks.retain(|_, l| Arc::strong_count(l) > 1);
            }
            Arc::clone(
                locks
                    .entry((namespace.to_string(), pvc.to_string()))
                    .or_default(),
            )
        };
        lock.lock_owned().await
    }

    /// Whether another restore into the PVC holds its turn now.
    pub fn busy(&self, namespace: &str, pvc: &str) -> bool {
        self.locks
            .lock()
            .ok()
            .and_then(|l| {
                l.get(&(namespace.to_string(), pvc.to_string()))
                    .map(|m| m.try_lock().is_err())
            })
            .unwrap_or(false)
    }
}

impl Ctx {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        stores: Stores,
        runs: RunStores,
        config: Config,
        agents: Arc<AgentDirectory>,
        notifier: Notifier,
        metrics: Metrics,
    ) -> Self {
        let prebackup_starting = crate::prebackup_pod::StartSlots::new(
            config.max_starting_prebackup_pods as usize,
            config.max_starting_prebackup_pods_per_namespace as usize,
        );
        Self {
            client,
            stores,
            runs,
            config,
            agents,
            notifier,
            metrics,
            inspector: Inspector::default(),
            prebackup_starting,
            schedules: std::sync::OnceLock::new(),
            restore_targets: RestoreTargets::default(),
            active: Mutex::new(HashSet::new()),
            known_repositories: Mutex::new(HashSet::new()),
            handled: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until every watch cache has had its first full list (bounded). Reconcilers call this
    /// first: the controllers run from the start, so the shared watches never wait for a consumer.
    pub async fn synced(&self) -> Result<(), crate::state::SyncTimeout> {
        crate::state::wait_all(&self.runs.ready).await?;
        self.stores.synced().await
    }

    /// The newest of `from_status` and what this process last handled for the action.
    pub fn handled_up_to(
        &self,
        uid: &str,
        action: &'static str,
        from_status: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        let mem = self
            .handled
            .lock()
            .ok()
            .and_then(|h| h.get(&(uid.to_string(), action)).copied());
        match (from_status, mem) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn set_handled(&self, uid: &str, action: &'static str, t: DateTime<Utc>) {
        if let Ok(mut h) = self.handled.lock() {
            let e = h.entry((uid.to_string(), action)).or_insert(t);
            *e = (*e).max(t);
        }
    }

    pub fn repository_known(&self, location: &str) -> bool {
        self.known_repositories
            .lock()
            .is_ok_and(|k| k.contains(location))
    }

    pub fn remember_repository(&self, location: &str) {
        if let Ok(mut k) = self.known_repositories.lock() {
            k.insert(location.to_string());
        }
    }

    /// Claims run `uid` for execution; `None` when it is already executing here.
    pub fn claim(self: &Arc<Self>, uid: &str) -> Option<Claim> {
        let mut active = self.active.lock().ok()?;
        active.insert(uid.to_string()).then(|| Claim {
            ctx: Arc::clone(self),
            uid: uid.to_string(),
        })
    }
}

/// Releases a run's claim when its execution ends, however it ends.
pub struct Claim {
    ctx: Arc<Ctx>,
    uid: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut active) = self.ctx.active.lock() {
            active.remove(&self.uid);
        }
    }
}
