//! What the inspector ([`crate::inspect`]) shares with the runs and the Schedule reconciler: the
//! Schedules whose locks to read next (a run of theirs ended), and the newest repository figures it
//! read. Kept apart from the inspector's task so the context can hold it without the task depending
//! back on the context's owner.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use stowage_api::RepositoryFigures;
use tokio::sync::Notify;

/// A Schedule: `(namespace, name)`.
pub type Key = (String, String);

/// What runs and the Schedule reconcile share with the task.
#[derive(Default)]
pub struct Inspector {
    /// Schedules whose locks to read at the next turn (a run of theirs just ended).
    pending: Mutex<BTreeSet<Key>>,
    wake: Notify,
    /// The newest figures this task read, per Schedule.
    figures: Mutex<HashMap<Key, RepositoryFigures>>,
}

impl Inspector {
    /// A run of `schedule` ended: read its repository's locks soon.
    pub fn run_ended(&self, namespace: &str, schedule: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert((namespace.to_string(), schedule.to_string()));
        }
        self.wake.notify_one();
    }

    /// The newest figures this task read for the Schedule.
    pub fn figures(&self, namespace: &str, schedule: &str) -> Option<RepositoryFigures> {
        let key = (namespace.to_string(), schedule.to_string());
        self.figures.lock().ok()?.get(&key).cloned()
    }

    /// Waits until a run ends (see [`Inspector::run_ended`]).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// The inspector read `figures` for the Schedule `key`.
    pub fn found(&self, key: Key, figures: RepositoryFigures) {
        if let Ok(mut m) = self.figures.lock() {
            m.insert(key, figures);
        }
    }

    /// The Schedules whose locks to read now, taken.
    pub fn take_pending(&self) -> BTreeSet<Key> {
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }
}
