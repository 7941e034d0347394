//! Fair shares per namespace: at most `per_namespace` holders at once for each namespace, each
//! namespace with its own FIFO queue (tokio's semaphores are fair). A caller takes its namespace's
//! share before any shared resource, so a namespace's requests beyond its share wait in their own
//! queue and never stand in front of another namespace's. The node agent shares its restic slots
//! this way, and the coordinator its PreBackupPod start slots.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The namespaces' queues. Entries of namespaces with nothing held or waiting are dropped whenever
/// a new one is added, so the map holds at most the namespaces with work in flight, plus one.
pub struct NamespaceShares {
    per_namespace: usize,
    queues: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl NamespaceShares {
    /// `per_namespace` is at least 1.
    pub fn new(per_namespace: usize) -> Self {
        Self {
            per_namespace: per_namespace.max(1),
            queues: Mutex::new(HashMap::new()),
        }
    }

    pub fn per_namespace(&self) -> usize {
        self.per_namespace
    }

    fn queue(&self, namespace: &str) -> Arc<Semaphore> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(q) = queues.get(namespace) {
            return Arc::clone(q);
        }
        // Held only by the map: no holder or waiter of that namespace is left.
        queues.retain(|_, q| Arc::strong_count(q) > 1);
        let q = Arc::new(Semaphore::new(self.per_namespace));
        queues.insert(namespace.to_string(), Arc::clone(&q));
        q
    }

    /// Waits for a place in `namespace`'s share; `None` once closed. Cancel-safe.
    pub async fn acquire(&self, namespace: &str) -> Option<OwnedSemaphorePermit> {
        self.queue(namespace).acquire_owned().await.ok()
    }

    /// Whether `namespace`'s share is fully held now (a new request would wait).
    pub fn busy(&self, namespace: &str) -> bool {
        self.queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(namespace)
            .is_some_and(|q| q.available_permits() == 0)
    }

    /// How many namespaces have an entry (for tests of the bound).
    pub fn tracked(&self) -> usize {
        self.queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Refuses every waiting and future request (shutdown).
    pub fn close(&self) {
        for q in self
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            q.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_full_share_queues_only_its_own_namespace_and_idle_ones_are_forgotten() {
        let shares = Arc::new(NamespaceShares::new(1));
        let a = shares.acquire("a").await.expect("a");
        assert!(shares.busy("a") && !shares.busy("b"));
        let waiting = Arc::clone(&shares);
        let a2 = tokio::spawn(async move { waiting.acquire("a").await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!a2.is_finished());
        let b = tokio::time::timeout(Duration::from_secs(1), shares.acquire("b"))
            .await
            .expect("b does not wait behind a")
            .expect("b");
        drop(a);
        let _a2 = tokio::time::timeout(Duration::from_secs(1), a2)
            .await
            .expect("a's next goes once a's first ends")
            .expect("join")
            .expect("a2");
        drop(b);
        let _c = shares.acquire("c").await;
        assert_eq!(shares.tracked(), 2, "b, idle, was dropped when c came");
        shares.close();
        assert!(shares.acquire("a").await.is_none());
    }
}
