//! The per-node bound on concurrent volume operations. Requests beyond it wait in FIFO order; none is
//! dropped. Queue length and running count are exported as gauges.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{GaugeGuard, Metrics};

#[derive(Clone)]
pub struct Limiter {
    slots: Arc<Semaphore>,
    metrics: Metrics,
}

/// A running operation's place; freed on drop.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _running: GaugeGuard,
}

impl Limiter {
    pub fn new(max_concurrent: u32, metrics: Metrics) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(
                usize::try_from(max_concurrent).unwrap_or(1).max(1),
            )),
            metrics,
        }
    }

    /// Whether a slot is free right now (so callers can tell the client it is queued).
    pub fn would_wait(&self) -> bool {
        self.slots.available_permits() == 0
    }

    /// Waits for a slot; `None` once the agent is shutting down. Cancel-safe: dropping the future
    /// leaves the queue.
    pub async fn acquire(&self) -> Option<Slot> {
        let queued = GaugeGuard::new(&self.metrics.queued);
        let permit = Arc::clone(&self.slots).acquire_owned().await.ok()?;
        drop(queued);
        Some(Slot {
            _permit: permit,
            _running: GaugeGuard::new(&self.metrics.running),
        })
    }

    /// Refuses every queued and future request (shutdown).
    pub fn close(&self) {
        self.slots.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn never_more_than_max_and_queue_is_counted() {
        let m = Metrics::new("n", "0.19.1").unwrap();
        let l = Limiter::new(2, m.clone());
        let a = l.acquire().await.unwrap();
        let _b = l.acquire().await.unwrap();
        assert!(l.would_wait());
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(m.queued.get(), 1);
        assert_eq!(m.running.get(), 2);
        drop(a);
        let _c = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.queued.get(), 0);
        assert_eq!(m.running.get(), 2);
        l.close();
        assert!(l.acquire().await.is_none());
        assert_eq!(m.queued.get(), 0);
    }
}
